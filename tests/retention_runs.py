"""Retention runs for the set-up equivalence test (tests/test_forgetting.py): a tiny GPT-2, plain under `none` and with
LoRA under `l2_sp` (its batched adapter gradient, added to `.grad` after the backward pass, DDP's averaging included),
trained 2 steps on a global batch of 4 rows as 1 x 4, as 1 x 2 with 2 accumulation steps, or as 2 gloo
processes x 2 (torchrun); each saves the logged retention metrics (forgetting, KL) of its evaluations.

    python -m tests.retention_runs SETUP OUT.pt          (SETUP: single, ga2, ddp; ddp under torchrun)
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch

SETUPS = ("single", "ga2", "ddp")
KEYS = ("eval_general_loss", "eval_general_forgetting", "eval_target_loss", "eval_target_kl")


def lora_cases() -> tuple[bool, ...]:
    """Plain, and LoRA where peft is installed (the lowest-versions environment has none)."""
    import importlib.util

    return (False, True) if importlib.util.find_spec("peft") else (False,)


def run(setup: str, lora: bool, folder: str) -> list[dict]:
    from transformers import GPT2LMHeadModel

    from hf_l2sp import SPConfig, SPTrainer
    from tests.text_models import gpt2_config, padded_lm_batch

    torch.manual_seed(0)
    model = GPT2LMHeadModel(gpt2_config(n_layer=2))
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0))
    args = SPConfig(
        output_dir=folder, use_cpu=True, report_to="none", save_strategy="no", max_steps=2,
        per_device_train_batch_size=4 if setup == "single" else 2,
        gradient_accumulation_steps=2 if setup == "ga2" else 1, per_device_eval_batch_size=4,
        learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", eval_strategy="steps", eval_steps=2,
        logging_steps=1, disable_tqdm=True, seed=0, data_seed=0, dataloader_num_workers=0,
        regularizer="l2_sp" if lora else "none", sp_alpha=0.5, sp_retention="general", sp_retention_kl="target",
    )
    train = padded_lm_batch(lengths=(8,) * 8, seed=1)
    evals = {"target": padded_lm_batch(lengths=(8,) * 4, seed=3), "general": padded_lm_batch(lengths=(8,) * 4, seed=2)}
    trainer = SPTrainer(model=model, args=args, train_dataset=train, eval_dataset=evals)
    trainer.train()
    return [{k: v for k, v in log.items() if k in KEYS or k == "step"} for log in trainer.state.log_history
            if any(k in log for k in KEYS)]


def main(setup: str, out: str) -> None:
    if setup not in SETUPS:
        raise SystemExit(f"unknown set-up {setup!r}; choose from {SETUPS}")
    rank = int(os.environ.get("RANK", 0))
    with tempfile.TemporaryDirectory() as tmp:
        results = {lora: run(setup, lora, os.path.join(tmp, str(lora))) for lora in lora_cases()}
    if rank == 0:
        torch.save(results, out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
