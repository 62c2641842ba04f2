"""One study run: fine-tune with SPTrainer on a seeded few-shot split, record validation (and test) accuracy and
drift. Run keys name everything that defines a run, so a finished run is found again by its key and never redone."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

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


def result_path(results_dir: str | os.PathLike, spec: RunSpec) -> Path:
    return Path(results_dir) / "runs" / f"{spec.key}.json"


def execute(spec: RunSpec, results_dir: str | os.PathLike) -> dict:
    """Train and evaluate `spec`, write its record atomically (a killed run leaves no record), return the record."""
    import torch
    from transformers import PrinterCallback, set_seed

    from ..config import SPConfig
    from ..data import DataArguments, build_transforms, collate_images, load_image_dataset, with_transforms
    from ..drift import compute_drift
    from ..metrics import compute_metrics
    from ..modeling import data_config_of, load_backbone
    from ..trainer import SPTrainer

    start = time.perf_counter()
    data_args = DataArguments(dataset_name=spec.dataset, max_train_samples_per_class=spec.size,
                              validation_fraction=spec.validation_fraction, image_size=spec.image_size,
                              augmentation="none")
    data = load_image_dataset(data_args, seed=spec.seed)
    set_seed(spec.seed)
    model, _ = load_backbone(spec.model, data.id2label)
    transforms = build_transforms(data_config_of(model), "none", spec.image_size)
    splits = with_transforms(data, transforms.train, transforms.eval)
    if len(splits["train"]) < spec.batch_size:
        raise ValueError(f"{spec.key}: {len(splits['train'])} training images, fewer than one batch of "
                         f"{spec.batch_size}; lower the batch size or raise the size per class.")
    scratch = Path(tempfile.mkdtemp(prefix="hf_l2sp_study_"))
    try:
        args = SPConfig(
            output_dir=str(scratch), regularizer=spec.regularizer, sp_fisher=spec.fisher_file,
            sp_delta_warmup_steps=spec.delta_warmup_steps,
            sp_delta_attention_batches=spec.delta_attention_batches, **dict(spec.hyperparameters),
            learning_rate=spec.learning_rate, max_steps=spec.steps, lr_scheduler_type="cosine",
            warmup_steps=max(1, round(spec.warmup_fraction * spec.steps)), optim="sgd",
            optim_args=f"momentum={spec.momentum}", weight_decay=0.0, max_grad_norm=0.0,
            per_device_train_batch_size=spec.batch_size, per_device_eval_batch_size=spec.eval_batch_size,
            eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
            seed=spec.seed, data_seed=spec.seed, dataloader_num_workers=0,
            # A last batch of one or two images makes train-mode BatchNorm statistics, and few-shot runs, explode.
            dataloader_drop_last=True,
        )
        trainer = SPTrainer(model=model, args=args, train_dataset=splits["train"],
                            eval_dataset=splits["validation"], data_collator=collate_images,
                            compute_metrics=compute_metrics)
        trainer.remove_callback(PrinterCallback)  # the study prints one line per run
        trainer.train()
        train_s = time.perf_counter() - start
        args.dataloader_drop_last = False  # Trainer applies it to evaluation too: every image must be scored
        val = trainer.evaluate(splits["validation"], metric_key_prefix="val")
        # The test split is read only by final runs, after training and with hyperparameters fixed beforehand.
        test = trainer.evaluate(splits["test"], metric_key_prefix="test") if spec.evaluates_test else {}
        drift = compute_drift(trainer.model, trainer.sp_reference.tensors,
                              set(trainer.sp_parameters().anchored_names))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    record = {
        **{k: v for k, v in asdict(spec).items() if k not in ("hyperparameters", "fisher_file")},
        **dict(spec.hyperparameters), "key": spec.key,
        "train_images": data.description["num_examples"]["train"],
        "val_images": data.description["num_examples"]["validation"],
        "test_images": data.description["num_examples"].get("test") if spec.evaluates_test else None,
        "val_accuracy": val["val_accuracy"], "test_accuracy": test.get("test_accuracy"),
        "drift": drift["total"]["relative_distance"],
        "drift_stages": {row["stage"]: row["relative_distance"] for row in drift["stages"]},
        "drift_layers": [row["relative_distance"] for row in drift["layers"]],
        "drift_layer_names": [row["name"] for row in drift["layers"]],
        "drift_layer_penalised": [row["penalised"] for row in drift["layers"]],
        "train_seconds": round(train_s, 2), "wall_seconds": round(time.perf_counter() - start, 2),
        "threads": torch.get_num_threads(),
    }
    write_record(result_path(results_dir, spec), record)
    return record


def write_record(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


def read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None

