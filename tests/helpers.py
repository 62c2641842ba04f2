"""Small real models and datasets for the tests (random init, no downloads)."""

from __future__ import annotations

import socket

import numpy as np
import torch
from datasets import Dataset, Value
from transformers import TimmWrapperConfig, TimmWrapperForImageClassification, ViTConfig, ViTForImageClassification

from hf_l2sp import SPConfig


def timm_classifier(architecture: str = "test_resnet", num_labels: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    labels = {i: f"class_{i}" for i in range(num_labels)}
    config = TimmWrapperConfig(architecture=architecture, num_labels=num_labels, id2label=labels,
                               label2id={v: k for k, v in labels.items()})
    return TimmWrapperForImageClassification(config)


def vit_classifier(num_labels: int = 3, seed: int = 0, image_size: int = 16):
    """A native transformers image classifier (accepts loss kwargs, LayerNorm only: batch-size independent)."""
    torch.manual_seed(seed)
    config = ViTConfig(image_size=image_size, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, num_labels=num_labels)
    return ViTForImageClassification(config)


def tensor_dataset(n: int = 16, num_labels: int = 3, size: int = 32, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    ds = Dataset.from_dict({
        "pixel_values": rng.standard_normal((n, 3, size, size)).astype("float32"),
        "labels": (np.arange(n) % num_labels).astype("int64"),
    })
    return ds.with_format("torch")


def sp_config(tmp_path, **overrides) -> SPConfig:
    kwargs = dict(
        output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", save_strategy="no", max_steps=2,
        per_device_train_batch_size=4, learning_rate=0.05, optim="sgd", lr_scheduler_type="constant",
        logging_steps=1, disable_tqdm=True, seed=0, data_seed=0, dataloader_num_workers=0,
        regularizer="l2_sp", sp_alpha=0.1, sp_beta=0.01, max_grad_norm=0.0,
    )
    kwargs.update(overrides)
    return SPConfig(**kwargs)


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def pil_images(n: int, size: int = 12, seed: int = 0, mode: str = "RGB"):
    from PIL import Image as PILImage

    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    out = []
    for _ in range(n):
        array = rng.integers(0, 255, (size, size, channels), dtype=np.uint8)
        out.append(PILImage.fromarray(array[..., 0] if channels == 1 else array, mode=mode))
    return out


def write_parquet_repo(root, splits=None, image_col="picture", label_col="category", num_labels=3,
                       names=None) -> str:
    """A local folder laid out like a Hub parquet dataset repo (data/<split>-00000-of-00001.parquet)."""
    from datasets import ClassLabel, Features, Image

    splits = splits or {"train": 30, "test": 9}
    names = names or [f"c{i}" for i in range(num_labels)]
    features = Features({image_col: Image(), label_col: ClassLabel(names=names), "note": Value("string")})
    (root / "data").mkdir(parents=True, exist_ok=True)
    for i, (split, n) in enumerate(splits.items()):
        ds = Dataset.from_dict({image_col: pil_images(n, seed=i), label_col: [j % len(names) for j in range(n)],
                                "note": [f"row {j}" for j in range(n)]}, features=features)
        ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return str(root)


def write_image_folder(root, per_class: int = 4, classes=("cat", "dog"), modes=("RGB", "L", "RGBA")) -> str:
    for s, split in enumerate(("train", "test")):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(pil_images(per_class, seed=10 * s + c, mode=modes[(c + 1) % len(modes)])):
                image.save(folder / f"{i}.png")
    return str(root)


def save_timm_folder(path, architecture: str = "test_resnet", num_classes: int = 5, seed: int = 0):
    """A timm-format checkpoint as timm's own save_for_hf writes it (model_args with num_classes included)."""
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(seed)
    model = timm.create_model(architecture, pretrained=False, num_classes=num_classes)
    save_for_hf(model, str(path), safe_serialization=True, model_args={"num_classes": num_classes})
    return model


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for rendezvous), instead of a fixed number another run may hold."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def image_run_assets(root, train: int):
    """A LayerNorm timm CNN checkpoint (no batch statistics) and a parquet image dataset with `train` training
    images, under `root`: what the multi-process `hf-l2sp train` runs read."""
    save_timm_folder(root / "model", architecture="test_convnext", num_classes=5)
    write_parquet_repo(root / "data", splits={"train": train, "validation": 3, "test": 3})
    return root
