"""Runs behind the invariance matrix (tests/test_invariance.py): every model x regularizer for one set-up.

    python -m tests.invariance_runs SETUP OUT            one process: base, ga2, grad
    torchrun --nproc_per_node 2 -m tests.invariance_runs SETUP OUT     ddp, fsdp2

Each run: 4 fixed images, a global batch of 4, 3 optimizer steps of SGD with momentum and gradient clipping that
engages, anchors perturbed away from the start so every penalty acts from the first step. OUT receives, for each
(model, regularizer), the final weights (full tensors, from rank 0) and what the run logged.

`fsdp2` reproduces what accelerate's FSDP2 `prepare` does, which accelerate only runs on GPUs: after SPTrainer is
built and anchored on plain parameters, `fully_shard` swaps every parameter of the same module object for a DTensor
shard, just before the optimizer is created. Trainer itself runs as one process per rank (each rank reads its half
of the batch); the sharded model averages the task gradients over the ranks, as it would under accelerate.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from torch import nn
from torch.distributed.fsdp import fully_shard

from hf_l2sp import Reference, SPConfig, SPTrainer
from hf_l2sp.anchor.fisher_io import FisherDiagonal, save_fisher
from hf_l2sp.loading.model_parts import base_prefix, checkpoint_key, find_head_modules

MODELS = ("timm_convnext", "native_resnet", "native_convnext", "gpt2_lm")
#: Models with a token-level loss (Trainer's num_items_in_batch normalisation) and padded sequences; FSDP2 is left to
#: the image models (GPT-2 ties its LM head to the embedding, which the harness's per-layer sharding does not cover).
TOKEN_MODELS = ("gpt2_lm",)
REGULARIZERS = ("l2_sp", "l1_sp", "group_lasso_sp", "l2_sp_fisher", "l2_sp+delta")
QUADRATIC = ("l2_sp", "l2_sp_fisher")  # those sp_mode='grad' applies to
SETUPS = ("base", "ga2", "grad", "ddp", "fsdp2")
MAX_GRAD_NORM = 0.5
STEPS = 3
SIZE = 32


def build_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    labels = {i: f"c{i}" for i in range(3)}
    common = dict(num_labels=3, id2label=labels, label2id={v: k for k, v in labels.items()})
    if kind == "timm_convnext":
        from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

        return TimmWrapperForImageClassification(TimmWrapperConfig(architecture="test_convnext", **common))
    if kind == "native_resnet":  # a **kwargs forward that drops num_items_in_batch
        from transformers import ResNetConfig, ResNetForImageClassification

        model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                          **common))
        return _without_batchnorm(model)
    if kind == "gpt2_lm":  # transformers Conv1D layers, a tied LM head, a loss over the window's tokens
        from transformers import GPT2LMHeadModel

        from .text_models import gpt2_config

        return GPT2LMHeadModel(gpt2_config())
    if kind == "native_convnext":
        from transformers import ConvNextConfig, ConvNextForImageClassification

        return ConvNextForImageClassification(ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2,
                                                             **common))
    raise ValueError(f"unknown model {kind!r}; choose from {MODELS}")


def _without_batchnorm(model: nn.Module) -> nn.Module:
    """Batch statistics differ between 1 x 4 and 2 x 2 images; Identity keeps the maths batch-size independent."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(module, child_name, nn.Identity())
    return model


def images(indices: list[int]) -> Dataset:
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((4, 3, SIZE, SIZE)).astype("float32")
    labels = np.array([0, 1, 2, 1], dtype="int64")
    return Dataset.from_dict({"pixel_values": pixels[indices], "labels": labels[indices]}).with_format("torch")


def training_data(kind: str, indices: list[int]) -> Dataset:
    if kind in TOKEN_MODELS:  # sequences of 8, 2, 3 and 8 tokens padded to 8, labels -100 on the pads
        from .text_models import padded_lm_batch

        return padded_lm_batch().select(indices)
    return images(indices)


def combinations(setup: str) -> list[tuple[str, str]]:
    """(model, regularizer) pairs a set-up runs: DELTA needs image stages, FSDP2 here covers the image models."""
    regularizers = QUADRATIC if setup == "grad" else REGULARIZERS
    return [(m, r) for m in MODELS for r in regularizers
            if not (m in TOKEN_MODELS and ("delta" in r or setup == "fsdp2"))]


def perturbed_reference(model: nn.Module):
    reference = Reference.snapshot(model, find_head_modules(model))
    gen = torch.Generator().manual_seed(1)
    for tensor in reference.tensors.values():
        tensor.add_(0.05 * torch.randn(tensor.shape, generator=gen))
    return reference


def fisher_file(model: nn.Module, reference, folder: Path) -> str:
    """A Fisher diagonal with a different weight for every entry (so a misaligned shard would show)."""
    gen = torch.Generator().manual_seed(2)
    prefix = base_prefix(model)
    tensors = {checkpoint_key(n, prefix): 0.5 + torch.rand(t.shape, generator=gen)
               for n, t in reference.tensors.items()}
    return str(save_fisher(FisherDiagonal(tensors, source="invariance test"), folder / "fisher.safetensors"))


def run_one(model_kind: str, regularizer: str, setup: str, workdir: Path, rank: int, world: int) -> dict:
    model = build_model(model_kind)
    reference = perturbed_reference(model)
    full_anchor = {k: v.clone() for k, v in reference.tensors.items()}
    sharded = setup == "fsdp2"
    per_device = 4 if setup in ("base", "grad") else 2
    folder = workdir / f"{model_kind}-{regularizer}-r{rank}"
    folder.mkdir(parents=True, exist_ok=True)
    args = SPConfig(
        output_dir=str(folder), use_cpu=True, report_to="none", save_strategy="no", max_steps=STEPS,
        per_device_train_batch_size=per_device, gradient_accumulation_steps=2 if setup == "ga2" else 1,
        learning_rate=0.05, optim="sgd", optim_args="momentum=0.9", lr_scheduler_type="constant",
        max_grad_norm=MAX_GRAD_NORM, logging_steps=1, disable_tqdm=True, seed=0, data_seed=0,
        dataloader_num_workers=0, regularizer=regularizer, sp_alpha=0.5, sp_beta=0.5, sp_include="all",
        sp_mode="grad" if setup == "grad" else "loss", sp_delta_alpha=0.05, sp_delta_attention="uniform",
        sp_fisher=fisher_file(model, reference, folder) if regularizer == "l2_sp_fisher" else None,
    )
    data = training_data(model_kind, [2 * rank, 2 * rank + 1] if sharded else [0, 1, 2, 3])
    trainer_class = ShardingSPTrainer if sharded else SPTrainer
    trainer = trainer_class(model=model, args=args, train_dataset=data, reference=reference)
    trainer.train()
    weights = {n: (p.full_tensor() if sharded else p).detach().clone() for n, p in model.named_parameters()}
    result = {"weights": weights, "logs": [log for log in trainer.state.log_history if "sp/penalty" in log]}
    if sharded:
        held = trainer.sp_reference.local_bytes()
        full_bytes = sum(t.numel() * t.element_size() for t in full_anchor.values())
        assembled = trainer.sp_reference.full_tensors()
        result.update(anchor_bytes=held, full_anchor_bytes=full_bytes,
                      anchor_assembled_exactly=all(torch.equal(assembled[k], full_anchor[k]) for k in full_anchor),
                      all_dtensor=all(type(p).__name__ == "DTensor" for p in trainer.sp_parameters().anchored))
    return result


class ShardingSPTrainer(SPTrainer):
    """Shards the model in place the way accelerate's FSDP2 prepare does, after SPTrainer anchored it."""

    def create_optimizer(self, *args, **kwargs):
        for module in list(self.model.modules())[1:]:
            if isinstance(module, (nn.Conv2d, nn.Linear)):  # several FSDP units, with uneven dim-0 shards
                fully_shard(module)
        fully_shard(self.model)
        return super().create_optimizer(*args, **kwargs)


def main(setup: str, out: str) -> None:
    if setup not in SETUPS:
        raise SystemExit(f"unknown set-up {setup!r}; choose from {SETUPS}")
    rank, world = 0, 1
    if setup == "fsdp2":
        import torch.distributed as dist

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):  # Trainer: one process per rank
            os.environ.pop(var, None)
    elif setup == "ddp":
        rank = int(os.environ.get("RANK", 0))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model_kind, regularizer in combinations(setup):
            results[(model_kind, regularizer)] = run_one(model_kind, regularizer, setup, Path(tmp), rank, world)
    if rank == 0:
        torch.save(results, out)
    if setup == "fsdp2":
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        os._exit(0)  # gloo's thread teardown after fully_shard can abort at interpreter exit; all is saved


if __name__ == "__main__":
    main(*sys.argv[1:3])
