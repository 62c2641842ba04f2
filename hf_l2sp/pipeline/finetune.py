"""One fine-tuning run from its options: load the data and the backbone, build the transforms and the trainer, train,
save and evaluate. `hf-l2sp train`, `demo`, the run engine of `search` / `compare` and the study all go through here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, DatasetDict
from torch import nn
from transformers import set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from ..artefacts.hub import push_output
from ..artefacts.trainer import SPTrainer
from ..loading.data import DataArguments, ImageData, load_evaluation_split, load_image_dataset
from ..loading.metrics import compute_metrics
from ..loading.models import BackboneReport, check_image_backbone, data_config_of, load_backbone
from ..loading.models import set_eval_data_config
from ..loading.transforms import collate_images, build_transforms, with_transforms
from ..training.config import SPConfig
from .options import ModelArguments
from ..utils.errors import ConfigError, OutputExistsError

logger = logging.getLogger("hf_l2sp.train")
#: The name `retention_dataset` is measured under: eval_retention_forgetting, ...
RETENTION_SET = "retention"


@dataclass
class PreparedRun:
    """Everything a run trains on: the data, the model with its fresh head, and the transformed splits."""

    data: ImageData
    model: nn.Module
    report: BackboneReport
    splits: DatasetDict
    retention: Dataset | None = None  # retention_dataset's split, transformed for evaluation

    def trainer(self, args: SPConfig, **kwargs) -> SPTrainer:
        retention = {RETENTION_SET: self.retention} if self.retention is not None else None
        return SPTrainer(model=self.model, args=args, train_dataset=self.splits["train"],
                         eval_dataset=self.splits.get("validation"), data_collator=collate_images,
                         compute_metrics=compute_metrics, backbone_report=self.report,
                         data_description=self.data.description, retention_datasets=retention, **kwargs)


def prepare_run(model_args: ModelArguments, data_args: DataArguments, seed: int,
                data_seed: int | None = None) -> PreparedRun:
    """Load and check the data (few-shot subset and validation carve drawn with `data_seed`), then the backbone
    with a new head initialised under `seed`: the same seed gives the same head on every process and every run."""
    check_image_backbone(model_args.model_name_or_path, model_args.model_revision, model_args.cache_dir)
    data = load_image_dataset(data_args, seed=seed if data_seed is None else data_seed)
    retention = _load_retention(data_args, seed)
    set_seed(seed)
    model, report = load_backbone(model_args.model_name_or_path, data.id2label, model_args.model_revision,
                                  model_args.cache_dir)
    transforms = build_transforms(data_config_of(model), data_args.augmentation, data_args.image_size)
    set_eval_data_config(model, transforms.eval_config)  # processors and pipelines reproduce this evaluation
    if retention is not None:
        retention = with_transforms(retention, transforms.eval, transforms.eval)["eval"]
    return PreparedRun(data, model, report, with_transforms(data, transforms.train, transforms.eval), retention)


def _load_retention(data_args: DataArguments, seed: int) -> ImageData | None:
    """`retention_dataset`'s split (a seeded sample of at most `max_retention_samples`), checked like the target's
    images; its labels are the source task's where it has them."""
    if not data_args.retention_dataset:
        return None
    retention_args = dataclasses.replace(
        data_args, dataset_name=data_args.retention_dataset, dataset_config_name=None, dataset_revision=None,
        image_column=None, label_column=None, max_eval_samples=data_args.max_retention_samples)
    return load_evaluation_split(retention_args, data_args.retention_split, seed=seed)


def check_output_dir(output_dir: str, overwrite: bool, resuming: bool) -> None:
    """Refuse a non-empty output folder unless asked to overwrite or resuming (which reads its checkpoints)."""
    path = Path(output_dir)
    if path.is_dir() and any(path.iterdir()) and not (overwrite or resuming):
        raise OutputExistsError(f"output_dir {output_dir!r} exists and is not empty. Choose another folder, pass "
                              "--overwrite_output_dir to write into it, or --resume_from_checkpoint to continue.")


def _remove_if_new_and_empty(folder: Path, existed: bool) -> None:
    if not existed and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def finetune(model_args: ModelArguments, data_args: DataArguments, args: SPConfig,
             quiet: bool = False) -> dict[str, float]:
    """Train, save (weights, drift, model card), evaluate on validation and test, and push if asked.

    `quiet` prints nothing of the run (no Trainer log dicts, progress bars or metric tables): the caller reports
    the returned metrics itself, as `hf-l2sp demo` does. Logs and metrics are still written to the output folder.

    Everything is loaded and checked before the output folder is touched. A push happens once, at the end, after
    the local folder is complete (Trainer would create the Hub repo at construction and push at every save).
    """
    if not model_args.model_name_or_path:
        raise ConfigError("model_name_or_path is required (in the recipe or as --model_name_or_path).")
    check_output_dir(args.output_dir, model_args.overwrite_output_dir, bool(args.resume_from_checkpoint))
    run = prepare_run(model_args, data_args, args.seed, args.data_seed)
    logger.info("Backbone: %s", run.report)
    logger.info("Data: %s", json.dumps(run.data.description["num_examples"]))
    push, args.push_to_hub = args.push_to_hub, False
    existed = Path(args.output_dir).exists()
    try:
        trainer = run.trainer(args)
    except Exception:
        _remove_if_new_and_empty(Path(args.output_dir), existed)  # Trainer creates it; a refused run leaves nothing
        raise
    if quiet:
        for printer in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(printer)
    resume = args.resume_from_checkpoint
    resume = True if isinstance(resume, str) and resume.lower() in ("true", "last") else resume
    metrics = dict(trainer.train(resume_from_checkpoint=resume).metrics)
    trainer.save_model()
    trainer.save_state()
    metrics.update(trainer.evaluate(metric_key_prefix="eval"))
    if "test" in run.splits:
        metrics.update(trainer.evaluate(run.splits["test"], metric_key_prefix="test"))
    if not quiet:
        trainer.log_metrics("all", metrics)
    trainer.save_metrics("all", metrics)
    trainer.create_model_card()  # now with the test results
    if push:
        args.push_to_hub = True
        push_output(trainer)
    return metrics
