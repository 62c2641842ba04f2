"""From images to tensors: timm train/eval transforms, lazily applied to the splits, and the batch collator."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from datasets import DatasetDict, Image

from .data import ROW, ImageData
from ..utils.errors import ConfigError


class ConfiguredTransform:
    """An evaluation transform that knows the timm data config reproducing it, so that a dataset it is applied to
    can tell the trainer what to record in the checkpoint (processors and pipelines then preprocess the same way)."""

    def __init__(self, transform: Callable, data_config: dict):
        self.transform, self.data_config = transform, dict(data_config)

    def __call__(self, image):
        return self.transform(image)

    def __repr__(self) -> str:
        return f"ConfiguredTransform({self.transform!r})"


#: Attributes `with_transforms` puts on each split's transform, read back by `transform_facts`.
EVAL_CONFIG_ATTRIBUTE, DESCRIPTION_ATTRIBUTE = "hf_l2sp_eval_data_config", "hf_l2sp_data_description"


def transform_facts(dataset) -> tuple[dict | None, dict | None]:
    """(evaluation data config, data description) that `with_transforms` attached to `dataset`'s transform; None
    for what it does not know (a dataset without a transform, or with someone else's)."""
    transform = ((getattr(dataset, "format", None) or {}).get("format_kwargs") or {}).get("transform")
    return getattr(transform, EVAL_CONFIG_ATTRIBUTE, None), getattr(transform, DESCRIPTION_ATTRIBUTE, None)


class Transforms(NamedTuple):
    train: Callable
    eval: Callable
    eval_config: dict  # the timm data config that reproduces `eval` (saved with the model for processors)


def build_transforms(data_config: dict, augmentation: str = "timm", image_size: int | None = None) -> Transforms:
    """Train and eval transforms from a timm data config (input_size, mean, std, interpolation, crop_pct)."""
    from timm.data import create_transform
    from torchvision import transforms as T

    config = dict(data_config)
    if image_size:
        config["input_size"] = (3, image_size, image_size)
    size = config["input_size"][-1]
    if augmentation == "paper":  # Li et al.: warp to 256x256, random 224 crop, mirror, colour jitter; centre crop
        config.update(crop_pct=0.875, crop_mode="squash")
        resize = round(size / 0.875)
        train_tf = T.Compose([T.Resize((resize, resize), interpolation=T.InterpolationMode.BILINEAR),
                              T.RandomCrop(size), T.RandomHorizontalFlip(),
                              T.ColorJitter(brightness=63 / 255, contrast=(0.2, 1.8), saturation=(0.5, 1.5)),
                              T.ToTensor(), T.Normalize(config["mean"], config["std"])])
    eval_tf = create_transform(**config, is_training=False)
    if augmentation == "timm":
        train_tf = create_transform(**config, is_training=True)
    elif augmentation == "none":
        train_tf = eval_tf
    return Transforms(train_tf, ConfiguredTransform(eval_tf, config), config)


def _transform(image_col: str, label_col: str, tf: Callable, split: str, eval_config: dict | None,
               description: dict):
    decoder = Image()

    def apply(batch):
        pixels = []
        for value, row in zip(batch[image_col], batch[ROW]):
            try:
                image = decoder.decode_example(value) if isinstance(value, dict) else value
                image = image.convert("RGB")
            except Exception as err:
                raise ConfigError(f"Cannot decode the image in row {row} of split {split!r} ({type(err).__name__}: "
                                  f"{err}). Fix or remove it, or pass skip_bad_images=True to drop such "
                                  "rows.") from err
            pixels.append(tf(image))
        return {"pixel_values": pixels, "labels": batch[label_col]}

    setattr(apply, EVAL_CONFIG_ATTRIBUTE, eval_config)
    setattr(apply, DESCRIPTION_ATTRIBUTE, description)
    return apply


def with_transforms(data: ImageData, train_tf: Callable, eval_tf: Callable) -> DatasetDict:
    """Lazily transformed splits yielding {'pixel_values', 'labels'} (train augmented, the others not).

    Each split's transform carries the evaluation data config (when `eval_tf` comes from `build_transforms`) and
    the data description, which `SPTrainer.save_model` records in the checkpoint and its card.
    """
    eval_config = getattr(eval_tf, "data_config", None)
    return DatasetDict({
        name: ds.with_transform(_transform(data.image_column, data.label_column,
                                           train_tf if name == "train" else eval_tf, name, eval_config,
                                           data.description))
        for name, ds in data.splits.items()
    })


def collate_images(features: list[dict]) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.stack([f["pixel_values"] for f in features]),
        "labels": torch.tensor([int(f["labels"]) for f in features], dtype=torch.long),
    }
