"""L2-SP on a mixture-of-experts LM: what the anchor holds, what the penalty costs, and what exact sums cost.

    python benchmarks/moe_anchor.py            # Mixtral-shaped, about 110 M values (a minute on 2 CPU cores)
    python benchmarks/moe_anchor.py --quick    # a smaller model, fewer repeats

a. Anchor bytes against the bytes of S (goal 1.0): the model is saved with `save_pretrained` (per-expert tensors)
   and reloaded (fused 3-D experts), as a user's checkpoint would be; S is read through transformers' conversion.
b. Omega + gradient (sp_mode 'loss' and 'grad') against the memory floor: one multi-tensor pass that reads w and w0
   and writes the gradient. Medians; ratios within one run.
c. The exact sum of squares (fp32 rows of 32 k values, float64 across rows) against the plain fused
   `_foreach_norm` it replaced, on the same tensors, interleaved.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from timing import median_seconds  # noqa: E402  (benchmarks/timing.py, beside this script)


def build(quick: bool):
    from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

    size = dict(hidden_size=256, intermediate_size=896, num_hidden_layers=2) if quick else dict(
        hidden_size=512, intermediate_size=1792, num_hidden_layers=4)
    config = MixtralConfig(vocab_size=32000, num_attention_heads=8, num_key_value_heads=2, num_local_experts=8,
                           num_experts_per_tok=2, tie_word_embeddings=False, **size)
    folder = tempfile.mkdtemp()
    torch.manual_seed(0)
    MixtralForCausalLM(config).save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats = 3 if args.quick else 10

    from hf_l2sp import SPConfig, SPTrainer
    from hf_l2sp.penalties.kernels import sum_of_squares
    from hf_l2sp.training.optimizer_side import OptimizerSidePenalty

    model = build(args.quick)
    trainer = SPTrainer(model=model, args=SPConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, report_to="none",
                                                   sp_alpha=0.1, sp_beta=0.01))
    sets = trainer.sp_parameters()
    anchored = sets.anchored_views()
    s_bytes = sum(p.numel() * p.element_size() for p in anchored)
    anchor_bytes = trainer.sp_reference.local_bytes()
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    total = sum(p.numel() for p in model.parameters())
    print(f"\n(a) {type(model).__name__}, {total / 1e6:.1f} M values ({experts / total:.1%} in fused experts), "
          f"{sets.coverage_text()}")
    print(f"anchor {anchor_bytes / 2**20:.1f} MiB, S {s_bytes / 2**20:.1f} MiB, ratio {anchor_bytes / s_bytes:.3f}")

    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3)
            p.grad = torch.zeros_like(p)
    regularizer = trainer.regularizer
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    side = OptimizerSidePenalty("grad", regularizer.quadratic_form(), sets, on_terms=lambda terms: None)

    def floor():
        with torch.no_grad():
            diff = torch._foreach_sub([p.detach() for p in sets.anchored], sets.anchors)
            torch._foreach_add_([p.grad for p in sets.anchored], diff, alpha=0.1)

    rows = [("floor (one foreach pass)", floor),
            ("sp_mode='grad'", lambda: side._hook(optimizer, (), {})),
            ("sp_mode='loss'", lambda: regularizer(sets).penalty.backward())]
    times = [(name, median_seconds(fn, repeats, warmup=1)) for name, fn in rows]
    print(f"\n(b) Omega + gradient over {sum(p.numel() for p in anchored) / 1e6:.1f} M anchored values, "
          f"{torch.get_num_threads()} threads, median of {repeats}")
    print(f"{'method':28s} {'ms':>8s} {'x floor':>8s}")
    for name, seconds in times:
        print(f"{name:28s} {seconds * 1e3:8.1f} {seconds / times[0][1]:8.2f}")

    diffs = [p.detach() - a for p, a in zip(anchored, sets.anchors)]
    exact_value = sum(float(d.double().square().sum()) for d in diffs)
    fused = lambda: torch.stack(torch._foreach_norm(diffs)).square().sum()  # noqa: E731
    exact = lambda: sum_of_squares(diffs)  # noqa: E731
    t_fused, t_exact = [], []
    for _ in range(repeats):  # interleaved
        t_fused.append(median_seconds(fused, 1, warmup=0))
        t_exact.append(median_seconds(exact, 1, warmup=0))
    t_fused.sort(), t_exact.sort()
    print(f"\n(c) sum of squares over the same {len(diffs)} tensors, median of {repeats}, interleaved")
    for name, ts, fn in (("_foreach_norm (before)", t_fused, fused), ("exact rows (now)", t_exact, exact)):
        error = abs(float(fn()) - exact_value) / exact_value
        print(f"{name:24s} {ts[len(ts) // 2] * 1e3:8.2f} ms   relative error {error:.1e}")


if __name__ == "__main__":
    main()
