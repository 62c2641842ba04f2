"""`hf-l2sp train`: fine-tune a pretrained backbone on an image dataset with an SP regularizer.

    hf-l2sp train --config offline_lite0_digits_l2sp   (a packaged recipe: hf_l2sp/recipes/)
    hf-l2sp train --config recipes/resnet50_dogs_l2_sp.yaml --sp_alpha 0.01 --output_dir runs/dogs
    hf-l2sp train --accelerate_config multi_gpu --config ...   (or fsdp2, zero2, multi_node, a YAML path)
    accelerate launch --multi_gpu --num_processes 2 -m hf_l2sp.cli train --config ...
"""

from __future__ import annotations

import json
import logging
import sys

from transformers import set_seed
from dataclasses import dataclass, field
from pathlib import Path

from ..argparsing import parse_with_recipe
from ..checkpoint import set_eval_data_config
from ..config import SPConfig
from ..hub import push_output
from ..data import DataArguments, build_transforms, collate_images, load_image_dataset, with_transforms
from ..metrics import compute_metrics
from ..modeling import data_config_of, load_backbone
from ..trainer import SPTrainer
from .launch import relaunch_under_accelerate, split_accelerate_config

logger = logging.getLogger("hf_l2sp.train")


@dataclass
class ModelArguments:
    """Which pretrained network to start from."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "timm Hub id (timm/resnet50.a1_in1k), timm name with tag, local timm or transformers "
                          "folder, transformers Hub id, or hf_l2sp:efficientnet_lite0 (offline ImageNet weights)."},
    )
    model_revision: str | None = field(default=None, metadata={"help": "Hub revision of the model."})
    cache_dir: str | None = field(default=None, metadata={"help": "Hub cache folder for the model files."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing into a non-empty output_dir (files there may be replaced)."}
    )


ARGUMENT_TYPES = (ModelArguments, DataArguments, SPConfig)


def parse_args(argv: list[str] | None = None):
    return parse_with_recipe(ARGUMENT_TYPES, argv, prog="hf-l2sp train", description=__doc__.split("\n")[0])


def check_output_dir(output_dir: str, overwrite: bool, resuming: bool) -> None:
    """Refuse a non-empty output folder unless asked to overwrite or resuming (which reads its checkpoints)."""
    path = Path(output_dir)
    if path.is_dir() and any(path.iterdir()) and not (overwrite or resuming):
        raise FileExistsError(f"output_dir {output_dir!r} exists and is not empty. Choose another folder, pass "
                              "--overwrite_output_dir to write into it, or --resume_from_checkpoint to continue.")


def _remove_if_new_and_empty(folder: Path, existed: bool) -> None:
    if not existed and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def run(model_args: ModelArguments, data_args: DataArguments, args: SPConfig) -> dict[str, float]:
    """Everything is loaded and checked before the output folder is touched."""
    if not model_args.model_name_or_path:
        raise ValueError("model_name_or_path is required (in the recipe or as --model_name_or_path).")
    check_output_dir(args.output_dir, model_args.overwrite_output_dir, bool(args.resume_from_checkpoint))
    data = load_image_dataset(data_args, seed=args.data_seed if args.data_seed is not None else args.seed)
    set_seed(args.seed)  # the new head's initialisation is part of the run: same seed, same head, on every rank
    model, report = load_backbone(model_args.model_name_or_path, data.id2label, model_args.model_revision,
                                  model_args.cache_dir)
    logger.info("Backbone: %s", report)
    logger.info("Data: %s", json.dumps(data.description["num_examples"]))
    transforms = build_transforms(data_config_of(model), data_args.augmentation, data_args.image_size)
    set_eval_data_config(model, transforms.eval_config)  # processors and pipelines reproduce this evaluation
    splits = with_transforms(data, transforms.train, transforms.eval)
    push = args.push_to_hub
    args.push_to_hub = False  # push once at the end, after the local output is complete (see push_output)

    existed = Path(args.output_dir).exists()
    try:
        trainer = SPTrainer(model=model, args=args, train_dataset=splits["train"], eval_dataset=splits["validation"],
                            data_collator=collate_images, compute_metrics=compute_metrics)
    except Exception:
        _remove_if_new_and_empty(Path(args.output_dir), existed)  # Trainer creates it; a refused run leaves nothing
        raise
    trainer.backbone_report, trainer.data_description = report, data.description
    resume = args.resume_from_checkpoint
    resume = True if isinstance(resume, str) and resume.lower() in ("true", "last") else resume
    result = trainer.train(resume_from_checkpoint=resume)
    metrics = dict(result.metrics)
    trainer.save_model()
    trainer.save_state()
    metrics.update(trainer.evaluate(metric_key_prefix="eval"))
    if "test" in splits:
        metrics.update(trainer.evaluate(splits["test"], metric_key_prefix="test"))
    trainer.log_metrics("all", metrics)
    trainer.save_metrics("all", metrics)
    trainer.create_model_card()  # now with the test results
    if push:
        args.push_to_hub = True
        push_output(trainer)
    return metrics


def main(argv: list[str] | None = None) -> int:
    config, rest = split_accelerate_config(list(sys.argv[2:] if argv is None else argv))
    if config:
        return relaunch_under_accelerate(config, "train", rest)
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", level=logging.INFO, stream=sys.stdout)
    model_args, data_args, args = parse_args(rest)
    metrics = run(model_args, data_args, args)
    if "test_accuracy" in metrics:
        print(f"test accuracy: {metrics['test_accuracy']:.4f}")
    return 0
