"""From images to tensors: timm train/eval transforms, lazily applied to the splits, and the batch collator."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from datasets import DatasetDict, Image

from .data import ROW, ImageData


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
    return Transforms(train_tf, eval_tf, config)


def _transform(image_col: str, label_col: str, tf: Callable, split: str):
    decoder = Image()

    def apply(batch):
        pixels = []
        for value, row in zip(batch[image_col], batch[ROW]):
            try:
                image = decoder.decode_example(value) if isinstance(value, dict) else value
                image = image.convert("RGB")
            except Exception as err:
                raise ValueError(f"Cannot decode the image in row {row} of split {split!r} ({type(err).__name__}: "
                                 f"{err}). Fix or remove it, or pass skip_bad_images=True to drop such rows.") from err
            pixels.append(tf(image))
        return {"pixel_values": pixels, "labels": batch[label_col]}

    return apply


def with_transforms(data: ImageData, train_tf: Callable, eval_tf: Callable) -> DatasetDict:
    """Lazily transformed splits yielding {'pixel_values', 'labels'} (train augmented, the others not)."""
    return DatasetDict({
        name: ds.with_transform(_transform(data.image_column, data.label_column,
                                           train_tf if name == "train" else eval_tf, name))
        for name, ds in data.splits.items()
    })


def collate_images(features: list[dict]) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.stack([f["pixel_values"] for f in features]),
        "labels": torch.tensor([int(f["labels"]) for f in features], dtype=torch.long),
    }
