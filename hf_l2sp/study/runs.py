"""One study run: a `RunSpec` names everything that defines it (its key finds a finished run again, so it is never
redone), and becomes a `tuning.engine.Trial`: the run engine that `hf-l2sp search` and `compare` use."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from ..tuning.engine import Trial

PHASES = ("lr", "grid", "final")


@dataclass(frozen=True)
class RunSpec:
    phase: str
    setting: str
    transfer: str
    model: str
    dataset: str
    regularizer: str
    size: int  # training images per class (at most)
    seed: int  # training subset, validation carve, head init and batch order
    learning_rate: float
    steps: int
    hyperparameters: tuple[tuple[str, float], ...]  # SPConfig fields (sp_alpha, sp_beta, ...)
    grid_value: float
    validation_fraction: float
    image_size: int
    batch_size: int
    eval_batch_size: int
    warmup_fraction: float
    momentum: float
    delta_warmup_steps: int
    delta_attention_batches: int
    fisher_file: str | None = None

    @property
    def key(self) -> str:
        fields = {k: v for k, v in asdict(self).items() if k != "fisher_file"}  # the file is fixed per setting
        digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]
        return f"{self.phase}/{self.setting}/{self.regularizer}_n{self.size}_s{self.seed}_{digest}"

    @property
    def evaluates_test(self) -> bool:
        return self.phase == "final"


def to_trial(spec: RunSpec) -> Trial:
    """The engine's run for `spec`: the options `hf-l2sp train` would take, its seed, and the study's fields."""
    options = {
        "model_name_or_path": spec.model, "dataset_name": spec.dataset, "max_train_samples_per_class": spec.size,
        "validation_fraction": spec.validation_fraction, "image_size": spec.image_size, "augmentation": "none",
        "regularizer": spec.regularizer, "sp_fisher": spec.fisher_file,
        "sp_delta_warmup_steps": spec.delta_warmup_steps, "sp_delta_attention_batches": spec.delta_attention_batches,
        **dict(spec.hyperparameters), "learning_rate": spec.learning_rate, "max_steps": spec.steps,
        "lr_scheduler_type": "cosine", "warmup_steps": max(1, round(spec.warmup_fraction * spec.steps)),
        "optim": "sgd", "optim_args": f"momentum={spec.momentum}", "weight_decay": 0.0, "max_grad_norm": 0.0,
        "per_device_train_batch_size": spec.batch_size, "per_device_eval_batch_size": spec.eval_batch_size,
        "dataloader_num_workers": 0,
        # A last batch of one or two images makes train-mode BatchNorm statistics, and few-shot runs, explode.
        "dataloader_drop_last": True,
    }
    fields = {**{k: v for k, v in asdict(spec).items() if k not in ("hyperparameters", "fisher_file")},
              **dict(spec.hyperparameters)}
    # The test split is read only by final runs, after training and with hyperparameters fixed beforehand.
    return Trial.make(options, seed=spec.seed, data_seed=spec.seed, evaluate_test=spec.evaluates_test,
                      key=spec.key, fields=fields)
