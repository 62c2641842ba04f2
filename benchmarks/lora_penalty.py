"""L2-SP on LoRA adapters: the r x r form against forming B A, on a 7B-shaped layer set (shapes only).

    python benchmarks/lora_penalty.py             # Llama-2-7B shapes, r = 16, 32 blocks (about a minute)
    python benchmarks/lora_penalty.py --rank 64

a. Value and gradient of alpha/2 sum_l s^2 ||B_l A_l||^2 over every q, k, v, o, gate, up, down projection of the
   32 blocks (4096 hidden, 11008 intermediate): hf_l2sp's r x r form, s^2 sum((B^T B) * (A A^T)), against forming
   each B A (autograd), timed on `--formed_blocks` blocks and scaled to 32 (forming all 224 products at once would
   need 6.5 G floats). Random values: the cost does not depend on them.
b. Anchor bytes: w0 of a LoRA model is its frozen base, so SPTrainer keeps no copy; measured on a real PEFT model
   (GPT-2-small shape with LoRA on its attention), against the bytes a plain L2-SP snapshot of the same weights
   would take.
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

from hf_l2sp.anchor.adapters import LoraTerm  # noqa: E402
from hf_l2sp.penalties.lora_distance import lora_squared_distance  # noqa: E402
from hf_l2sp.penalties.group_lasso_sp import GroupLassoSP  # noqa: E402

HIDDEN, INTERMEDIATE, BLOCKS = 4096, 11008, 32
PROJECTIONS = [(HIDDEN, HIDDEN)] * 4 + [(INTERMEDIATE, HIDDEN)] * 2 + [(HIDDEN, INTERMEDIATE)]  # (out, in)


def terms_for(blocks: int, rank: int) -> list[LoraTerm]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for block in range(blocks):
        for i, (rows, cols) in enumerate(PROJECTIONS):
            a = (0.01 * torch.randn(rank, cols, generator=gen)).requires_grad_(True)
            b = (0.01 * torch.randn(rows, rank, generator=gen)).requires_grad_(True)
            out.append(LoraTerm(f"layers.{block}.{i}", a, b, 2.0, torch.empty(rows, cols, device="meta")))
    return out


def table_a(rank: int, formed_blocks: int, repeats: int) -> None:
    terms = terms_for(BLOCKS, rank)
    params = [p for t in terms for p in (t.lora_A, t.lora_B)]

    def ours():
        value = 0.5 * lora_squared_distance(terms)
        torch.autograd.grad(value, params)

    def group_lasso():  # exact row norms s sqrt(B_g (A A^T) B_g^T), as GroupLassoSP.lora_penalty computes them
        value, _ = GroupLassoSP(alpha=1.0).lora_penalty(terms)
        torch.autograd.grad(value, params)

    few = terms[:formed_blocks * len(PROJECTIONS)]
    few_params = [p for t in few for p in (t.lora_A, t.lora_B)]

    def formed():
        value = sum(0.5 * (t.scaling * (t.lora_B @ t.lora_A)).square().sum() for t in few)
        torch.autograd.grad(value, few_params)

    check = float(0.5 * lora_squared_distance(few).detach())
    direct = float(sum(0.5 * (t.scaling * (t.lora_B @ t.lora_A)).square().sum() for t in few).detach())
    ours_s = median_seconds(ours, repeats)
    group_s = median_seconds(group_lasso, repeats)
    formed_s = median_seconds(formed, max(1, repeats // 3)) * BLOCKS / formed_blocks
    print(f"\n(a) value + gradient over {len(terms)} LoRA layers (7B shapes, r = {rank}), median of {repeats}")
    print(f"{'method':44s} {'ms':>10s}")
    print(f"{'r x r form (hf_l2sp)':44s} {ours_s * 1e3:10.1f}")
    print(f"{'group_lasso_sp rows from the factors':44s} {group_s * 1e3:10.1f}")
    print(f"{f'forming B A (measured on {formed_blocks} blocks, x {BLOCKS // formed_blocks})':44s} "
          f"{formed_s * 1e3:10.1f}")
    print(f"speed-up {formed_s / ours_s:.0f}x; relative difference of the values "
          f"{abs(check - direct) / direct:.1e}")


def table_b() -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from hf_l2sp import SPConfig, SPTrainer
    from tests.text_models import padded_lm_batch

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_embd=768, n_layer=12, n_head=12, vocab_size=50257))
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=["c_attn", "c_proj"],
                                            fan_in_fan_out=True, task_type="CAUSAL_LM"))
    args = SPConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, report_to="none", regularizer="l2_sp")
    trainer = SPTrainer(model=model, args=args, train_dataset=padded_lm_batch())
    held = sum(t.numel() * t.element_size() for t in trainer.sp_reference.tensors.values())
    adapted = sum(t.base_weight.numel() * t.base_weight.element_size() for t in trainer.sp_parameters().lora)
    print("\n(b) anchor bytes, GPT-2-small shape with LoRA r = 16 on c_attn and c_proj")
    print(f"adapted base weights {adapted / 2**20:.1f} MiB; anchor held by SPTrainer {held / 2**20:.1f} MiB "
          f"(ratio {held / adapted:.3f}); LoRA layers {len(trainer.sp_parameters().lora)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--formed_blocks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    table_a(args.rank, args.formed_blocks, args.repeats)
    table_b()


if __name__ == "__main__":
    main()
