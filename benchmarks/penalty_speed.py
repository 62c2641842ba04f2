"""Cost of the L2-SP penalty and its gradient, and of a training step with it.

    python benchmarks/penalty_speed.py            # all tables (several minutes on 2 CPU cores)
    python benchmarks/penalty_speed.py --quick    # fewer repeats, small models only (about a minute)

a. Omega + gradient over ResNet-50's parameters (23.5 M): hf_l2sp's kernels (loss path: value + autograd
   backward; grad path: closed form straight into .grad) vs the common per-parameter autograd loop vs the floor
   (one multi-tensor pass reading w and w0 and writing the gradient).
b. SPTrainer step time with l2_sp vs none, same model, data and seed.
c. Memory: bytes of the anchor vs one fp32 copy of the anchored parameters.
Medians of repeated runs; ratios are measured within one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from timing import median_seconds  # noqa: E402  (benchmarks/timing.py, beside this script)


def median_time(fn, repeats: int, warmup: int = 2) -> float:
    return median_seconds(fn, repeats, warmup)


def table_a(repeats: int) -> None:
    import timm

    from hf_l2sp import Reference
    from hf_l2sp.training.optimizer_side import OptimizerSidePenalty
    from hf_l2sp.anchor.parameters import resolve_parameters
    from hf_l2sp.penalties.l2_sp import L2SP

    model = timm.create_model("resnet50", pretrained=False)
    reference = Reference.snapshot(model, ["fc"])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3)
    sets = resolve_parameters(model, reference.tensors, "all")
    params, anchors = sets.anchored, sets.anchors
    regularizer = L2SP(0.1, 0.01)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)

    def ours_loss_path():
        regularizer(sets).penalty.backward()

    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    penalty = OptimizerSidePenalty("grad", regularizer.quadratic_form(), sets, on_terms=lambda terms: None)

    def ours_grad_path():  # value and gradient from one pass, as in the optimizer step pre-hook
        penalty._hook(optimizer, (), {})

    def per_parameter_loop():
        total = 0.0
        for p, a in zip(params, anchors):
            total = total + 0.5 * 0.1 * (p - a).pow(2).sum()
        total.backward()

    def floor():
        with torch.no_grad():
            grads = [p.grad for p in params]
            diff = torch._foreach_sub([p.detach() for p in params], anchors)
            torch._foreach_add_(grads, diff, alpha=0.1)

    rows = [(name, median_time(fn, repeats)) for name, fn in
            [("floor (one foreach pass)", floor), ("hf_l2sp grad path", ours_grad_path),
             ("hf_l2sp loss path", ours_loss_path), ("per-parameter autograd loop", per_parameter_loop)]]
    base = rows[0][1]
    n = sum(p.numel() for p in params)
    print(f"\n(a) Omega + gradient, ResNet-50, {len(params)} tensors, {n / 1e6:.1f} M parameters, "
          f"{torch.get_num_threads()} threads, median of {repeats}")
    print(f"{'method':32s} {'ms':>8s} {'x floor':>8s}")
    for name, t in rows:
        print(f"{name:32s} {t * 1e3:8.2f} {t / base:8.2f}")
    loop, ours = rows[3][1], rows[2][1]
    print(f"per-parameter loop / hf_l2sp loss path: {loop / ours:.2f}x")


def table_b(configs, steps: int) -> None:
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    from hf_l2sp import SPConfig, SPTrainer
    from tests.helpers import tensor_dataset

    print(f"\n(b) SPTrainer step time, l2_sp vs none, SGD, median over {steps} steps (after 2 warm-up steps)")
    print(f"{'model':10s} {'px':>4s} {'batch':>5s} {'none ms':>9s} {'l2_sp ms':>9s} {'overhead':>9s}")
    for arch, size, batch in configs:
        results = {}
        # Interleave the two regularizers over rounds so drift of the machine hits both alike.
        times = {"none": [], "l2_sp": []}
        trainers = {}
        for name in times:
            torch.manual_seed(0)
            model = TimmWrapperForImageClassification(TimmWrapperConfig(architecture=arch, num_labels=10))
            args = SPConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, report_to="none", save_strategy="no",
                            max_steps=steps + 2, per_device_train_batch_size=batch, optim="sgd",
                            learning_rate=1e-3, disable_tqdm=True, regularizer=name, logging_steps=10_000)
            trainer = SPTrainer(model=model, args=args, train_dataset=tensor_dataset(batch * (steps + 2), size=size))
            stamps = []

            class Timer(__import__("transformers").TrainerCallback):
                def on_step_begin(self, *a, **k):
                    stamps.append(time.perf_counter())

            trainer.add_callback(Timer())
            trainers[name] = (trainer, stamps)
        for name, (trainer, stamps) in trainers.items():
            trainer.train()
            steps_time = [b - a for a, b in zip(stamps, stamps[1:])][2:]
            times[name] = steps_time
        for name in times:
            results[name] = statistics.median(times[name])
        overhead = results["l2_sp"] / results["none"] - 1
        print(f"{arch:10s} {size:4d} {batch:5d} {results['none'] * 1e3:9.1f} {results['l2_sp'] * 1e3:9.1f} "
              f"{overhead * 100:8.1f}%")


def table_c() -> None:
    import timm

    from hf_l2sp import Reference
    from hf_l2sp.loading.model_parts import find_head_modules

    model = timm.create_model("resnet50", pretrained=False)
    params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("fc."))
    reference = Reference.snapshot(model, find_head_modules(model))
    anchor_bytes = sum(t.numel() * t.element_size() for t in reference.tensors.values())
    print("\n(c) Memory of the anchor, ResNet-50")
    print(f"anchored parameters {params / 1e6:.2f} M; one fp32 copy {params * 4 / 2**20:.1f} MiB; "
          f"anchor held {anchor_bytes / 2**20:.1f} MiB ({anchor_bytes / (params * 4):.3f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    table_a(repeats=5 if args.quick else 20)
    configs = [("resnet18", 64, 32)] if args.quick else [("resnet18", 64, 32), ("resnet50", 224, 8)]
    table_b(configs, steps=4 if args.quick else 8)
    table_c()


if __name__ == "__main__":
    main()
