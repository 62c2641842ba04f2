"""Cost of checking every image before training (`hf_l2sp.loading.data.check_images`), first run and cached rerun.

    python benchmarks/image_scan.py                 # the digits and a 10,000-image folder (a few minutes)
    python benchmarks/image_scan.py --images 2000   # a smaller folder

The folder holds 224x224 JPEGs in 10 class folders, loaded with datasets' `imagefolder`, as a user's local data
would be. Each scan decodes every image fully (PIL loads lazily, so a truncated file is only found by decoding).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
from datasets import Image, load_dataset  # noqa: E402
from PIL import Image as PILImage  # noqa: E402

from hf_l2sp.loading import assets  # noqa: E402
from hf_l2sp.loading.data import ROW, check_images  # noqa: E402


def make_folder(root: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)
    for i in range(n):
        folder = root / "train" / f"class_{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        image = np.roll(base, i, axis=0) ^ np.uint8(i % 251)
        PILImage.fromarray(image).save(folder / f"{i}.jpg", quality=90)
    return root


def scan(ds, name: str, workers: int | None) -> float:
    ds = ds.add_column(ROW, list(range(len(ds)))).cast_column("image", Image(decode=False))
    start = time.perf_counter()
    check_images({name: ds}, "image", {name: name}, skip=False, workers=workers)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=10_000)
    options = parser.parse_args()
    rows = []
    digits = load_dataset(assets.resolve("hf_l2sp:digits"))
    stamp = time.time_ns()  # new fingerprints: the first scan below is never served from an earlier run's cache
    for split in ("train", "test"):
        ds = digits[split].map(lambda b: b, batched=True, new_fingerprint=f"digits-{split}-{stamp}")
        rows.append((f"digits {split}", len(ds), scan(ds, split, None), scan(ds, split, None)))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        folder = make_folder(Path(tmp) / "folder", options.images)
        made = time.perf_counter() - start
        ds = load_dataset("imagefolder", data_dir=str(folder), cache_dir=str(Path(tmp) / "cache"))["train"]
        for workers in (1, None):
            label = "1 process" if workers == 1 else f"auto ({min(4, os.cpu_count() or 1)} processes)"
            fresh = ds.map(lambda b: b, batched=True, new_fingerprint=f"fresh-{workers}-{stamp}")  # a new fingerprint
            rows.append((f"folder, {label}", len(ds), scan(fresh, "train", workers), scan(fresh, "train", workers)))
    print(f"(writing the {options.images} JPEGs took {made:.1f} s)")
    print("| data | images | first scan (s) | images/s | cached rerun (s) |")
    print("| --- | --- | --- | --- | --- |")
    for name, n, first, second in rows:
        print(f"| {name} | {n} | {first:.2f} | {n / first:.0f} | {second:.2f} |")


if __name__ == "__main__":
    main()
