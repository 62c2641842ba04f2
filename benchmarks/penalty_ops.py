"""Operations the penalty dispatches per training step, against the number of tensors: the CPU-side proxy for a
GPU's kernel launches.

    python benchmarks/penalty_ops.py          # about 3 minutes on 2 CPU cores

Counts the aten compute operations of the second step of a real `SPTrainer` run (forward, backward, optimizer
step): of 2 steps, so the last, which computes Omega's value in every mode; of 3 steps for the rows "a step that
does not log". With the penalty, less those of the same run without it (`regularizer="none"`); view-only
operations are left out (they launch nothing). Tiny GPT-2s of 6 and 24 layers (76 and 292 tensors), every `sp_mode`, fp32 and bf16;
LoRA (q and v) on tiny Llamas of 6 and 24 layers; and, for `l2_sp`, the pieces an accelerator walks (packed,
1/PIECES_PER_PASS of the set each), forced on the CPU. The counting is `tests/test_penalty_ops.py`'s, which keeps
these counts flat in the suite.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hf_l2sp.penalties import streaming  # noqa: E402
from tests.test_penalty_ops import gpt2, lora_llama, step_ops  # noqa: E402


def extra_ops(build, max_steps=2, **sp) -> int:
    with tempfile.TemporaryDirectory() as folder:
        penalised = step_ops(build(), Path(folder) / "sp", max_steps=max_steps, **sp)
        plain = step_ops(build(), Path(folder) / "none", max_steps=max_steps, regularizer="none")
    penalised.subtract(plain)
    return sum(penalised.values())


def row(label, build_for, max_steps=2, **sp) -> None:
    counts = [extra_ops(lambda: build_for(layers), max_steps, **sp) for layers in (6, 24)]
    print(f"| {label} | {counts[0]} | {counts[1]} |", flush=True)


def main() -> None:
    print("| case | 6 layers | 24 layers |\n| --- | --- | --- |")
    for bf16 in (False, True):
        dtype = "bf16" if bf16 else "fp32"
        for mode in ("loss", "grad", "decoupled"):
            row(f"`l2_sp` {mode} {dtype}", lambda n, b=bf16: gpt2(n, b), regularizer="l2_sp", sp_mode=mode, sp_alpha=0.1)
        for mode in ("grad", "decoupled"):  # step 2 of 3: neither logs nor ends the run, so no value is computed
            row(f"`l2_sp` {mode} {dtype}, a step that does not log", lambda n, b=bf16: gpt2(n, b), max_steps=3,
                regularizer="l2_sp", sp_mode=mode, sp_alpha=0.1)
    for regularizer in ("l2", "l1_sp", "group_lasso_sp"):
        row(f"`{regularizer}` loss fp32", lambda n: gpt2(n, False), regularizer=regularizer, sp_alpha=0.1)
    row("LoRA (q, v), `l2_sp` loss fp32", lora_llama, regularizer="l2_sp", sp_alpha=0.1)
    streaming.on_accelerator = lambda device: True  # the pieces an accelerator walks, on this CPU
    streaming.PIECE_VALUES = 64
    for mode in ("loss", "grad", "decoupled"):
        row(f"`l2_sp` {mode} fp32, accelerator pieces", lambda n: gpt2(n, False), regularizer="l2_sp", sp_mode=mode,
            sp_alpha=0.1)
    for mode in ("grad", "decoupled"):
        row(f"`l2_sp` {mode} fp32, accelerator pieces, a step that does not log", lambda n: gpt2(n, False),
            max_steps=3, regularizer="l2_sp", sp_mode=mode, sp_alpha=0.1)


if __name__ == "__main__":
    main()
