"""Runs behind tests/test_deepspeed.py: SPTrainer under DeepSpeed (2 CPU processes) and the same runs in one process.

    python -m tests.deepspeed_runs OUT CASES                                        one process, no DeepSpeed
    accelerate launch --config_file zero3.yaml -m tests.deepspeed_runs OUT CASES    under DeepSpeed

Each case trains a tiny Llama sequence classifier (its `score` head is new) on 16 token sequences: a global batch
of 4 x 2 accumulation steps, SGD with momentum, gradient clipping that engages, and an anchor perturbed away from the
start so that the penalty acts from the first step. OUT/<case>/ receives the final model (`save_model`), the logs,
and per rank the bytes of w0 it holds. CASES is a comma-separated subset of `CASES` (all by default), plus
`resume` (4 steps saved at step 2, then a new trainer resumed from that checkpoint) and `refusals` (what ZeRO-3
refuses at construction).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from datasets import Dataset
from transformers import LlamaConfig, LlamaForSequenceClassification, LlamaModel

from hf_l2sp import Reference, SPConfig, SPTrainer
from hf_l2sp.anchor.fisher_io import FisherDiagonal, save_fisher
from hf_l2sp.loading.model_parts import base_prefix, checkpoint_key
from hf_l2sp.training.zero3 import is_partitioned, whole_parameters
from hf_l2sp.utils.errors import ConfigError

CASES = {
    "l2_sp-loss": dict(regularizer="l2_sp"),
    "l2_sp-grad": dict(regularizer="l2_sp", sp_mode="grad"),
    "l2_sp-decoupled": dict(regularizer="l2_sp", sp_mode="decoupled"),
    "l2_sp_fisher-loss": dict(regularizer="l2_sp_fisher"),
    "l2-loss": dict(regularizer="l2"),
    "none-loss": dict(regularizer="none"),
    # a retention set measured at the start and at step 2 (feature CKA through the partitioned model)
    "none-retention": dict(regularizer="none", sp_retention="held", sp_retention_measure="cka",
                           eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=2),
}
PER_DEVICE_ONE_PROCESS = 4


def save_backbone(folder: Path) -> Path:
    """A tiny Llama backbone saved as a pretrained checkpoint (the classifier's score head is not in it: new)."""
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
        LlamaModel(config).save_pretrained(folder)
    return folder


def build_model(backbone: Path) -> LlamaForSequenceClassification:
    """From the checkpoint, as a user loads it (under ZeRO-3, partitioned as it loads once TrainingArguments exist),
    with the new head set to the same values in every set-up."""
    model = LlamaForSequenceClassification.from_pretrained(backbone)
    head = model.score.weight
    writing = deepspeed_gathered(head) if is_partitioned(model) else contextlib.nullcontext()
    with writing, torch.no_grad():
        head.copy_(0.1 * torch.randn(head.shape, generator=torch.Generator().manual_seed(4)))
    return model


def deepspeed_gathered(param):
    """`param` whole; what rank 0 writes into it goes back to every rank's partition."""
    import deepspeed

    return deepspeed.zero.GatheredParameters([param], modifier_rank=0)


def dataset() -> Dataset:
    ids = torch.randint(1, 64, (16, 8), generator=torch.Generator().manual_seed(1))
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] % 3).tolist()})


def perturbed_reference(model) -> Reference:
    """w0 = the starting weights plus noise: the penalty and its gradient are not zero at the first step."""
    reference = Reference.snapshot(model, ["score"])
    gen = torch.Generator().manual_seed(3)
    for tensor in reference.tensors.values():
        tensor.add_(0.05 * torch.randn(tensor.shape, generator=gen))
    return reference


def fisher_file(model, reference, folder: Path) -> str:
    gen = torch.Generator().manual_seed(2)
    tensors = {checkpoint_key(n, base_prefix(model)): 0.5 + torch.rand(t.shape, generator=gen)
               for n, t in reference.tensors.items()}
    rank = os.environ.get("RANK", "0")  # every rank writes its own copy: one shared file would race
    return str(save_fisher(FisherDiagonal(tensors, source="deepspeed test"), folder / f"fisher-r{rank}.safetensors"))


def config(out: Path, world: int, **overrides) -> SPConfig:
    values = dict(output_dir=str(out), per_device_train_batch_size=PER_DEVICE_ONE_PROCESS // world,
                  gradient_accumulation_steps=2, max_steps=2, learning_rate=0.05, optim="sgd",
                  optim_args="momentum=0.9", lr_scheduler_type="constant", max_grad_norm=0.5, use_cpu=True,
                  report_to="none", save_strategy="no", logging_steps=1, sp_alpha=2.0, sp_beta=0.5, seed=0,
                  dataloader_num_workers=0, disable_tqdm=True)
    values.update(overrides)
    return SPConfig(**values)


def train(out: Path, world: int, rank: int, resume: str | None = None, **overrides) -> SPTrainer:
    model = build_model(save_backbone(out.parent / f"backbone-r{rank}"))
    with whole_parameters(model):
        reference = perturbed_reference(model)
    if overrides.get("regularizer") == "l2_sp_fisher":
        out.mkdir(parents=True, exist_ok=True)
        overrides["sp_fisher"] = fisher_file(model, reference, out)
    full_bytes = reference.local_bytes()
    held = {"held": dataset().select(range(6))} if overrides.get("sp_retention") else None
    trainer = SPTrainer(model=model, args=config(out, world, **overrides), train_dataset=dataset(),
                        eval_dataset=held, reference=reference)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    logs = [entry for entry in trainer.state.log_history if "sp/penalty" in entry or "eval_held_cka" in entry]
    (out / f"rank{rank}.json").write_text(json.dumps({"anchor_bytes": trainer.sp_reference.local_bytes(),
                                                      "full_anchor_bytes": full_bytes, "logs": logs}))
    return trainer


def refusals(out: Path, world: int, rank: int) -> dict[str, str]:
    """The message each configuration ZeRO-3 cannot make exact stops with, at construction."""
    found = {}
    for name, overrides in {"l1_sp": dict(regularizer="l1_sp"), "group_lasso_sp": dict(regularizer="group_lasso_sp"),
                            "bss": dict(regularizer="l2_sp+bss"), "kl": dict(sp_retention_kl="held")}.items():
        try:
            SPTrainer(model=build_model(save_backbone(out / f"backbone-r{rank}")),
                      args=config(out / name, world, **overrides), train_dataset=dataset(),
                      eval_dataset={"held": dataset()})
            found[name] = "accepted"
        except ConfigError as err:
            found[name] = str(err)
    return found


def main(out: str, names: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    out_dir = Path(out)
    for name in names.split(","):
        if name == "resume":
            straight = train(out_dir / "resume-straight", world, rank, max_steps=4, save_strategy="steps",
                             save_steps=2)
            del straight
            train(out_dir / "resume-resumed", world, rank, max_steps=4,
                  resume=str(out_dir / "resume-straight" / "checkpoint-2"))
        elif name == "refusals":
            found = refusals(out_dir, world, rank)
            if rank == 0:
                (out_dir / "refusals.json").write_text(json.dumps(found))
        else:
            train(out_dir / name, world, rank, **CASES[name])
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else ",".join(CASES))
