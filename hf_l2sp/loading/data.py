"""Image classification data from the Hub or local folders: columns, labels, splits, few-shot subsets, transforms."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Image, Value, load_dataset, load_from_disk

from . import assets
from ..utils.hub import datasets_offline, is_local_path
from ..utils.errors import ConfigError, MissingFileError

logger = logging.getLogger(__name__)
VALIDATION_NAMES = ("validation", "valid", "val", "dev")
AUGMENTATIONS = ("timm", "paper", "none")
ROW = "__row__"
NO_SPLIT = "none"


@dataclass
class DataArguments:
    """Which images to train on and how to feed them."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset id, or a local folder (imagefolder, parquet repo, save_to_disk)."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_revision: str | None = field(default=None, metadata={"help": "Hub revision of the dataset."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    validation_split: str | None = field(
        default=None, metadata={"help": "Validation split; default: validation/valid/val/dev, else carved from train."}
    )
    test_split: str | None = field(
        default=None, metadata={"help": "Test split; default: 'test' when present; 'none': no test split."}
    )
    validation_fraction: float = field(
        default=0.1,
        metadata={"help": "Share of train held out (stratified, seeded) when there is no validation split."}
    )
    image_column: str | None = field(default=None, metadata={"help": "Image column; default: the Image feature."})
    label_column: str | None = field(default=None, metadata={"help": "Label column; default: the ClassLabel feature."})
    max_train_samples_per_class: int | None = field(
        default=None, metadata={"help": "Few-shot: keep at most this many training images per class (seeded)."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Cap on validation and test sizes."})
    image_size: int | None = field(
        default=None, metadata={"help": "Square input size; default: the model's own data config."}
    )
    augmentation: str = field(
        default="timm",
        metadata={"help": "Training augmentation: 'timm' (model data config), 'paper' (256 warp, 224 crop, flip, "
                          "colour jitter) or 'none'."},
    )
    skip_bad_images: bool = field(
        default=False, metadata={"help": "Drop rows whose image cannot be decoded instead of stopping (every image "
                                         "the run reads is checked before training)."}
    )
    image_check_workers: int | None = field(
        default=None, metadata={"help": "Processes for the image check; default: up to 4 for splits of 2,000+."}
    )
    retention_dataset: str | None = field(
        default=None,
        metadata={"help": "Retention image set (Hub id or local folder, like dataset_name): what the source model "
                          "knew. Every evaluation logs eval_retention_forgetting (see sp_retention_measure)."},
    )
    retention_split: str | None = field(
        default=None, metadata={"help": "Split of retention_dataset; default: validation, else test, else train."}
    )
    max_retention_samples: int | None = field(
        default=500, metadata={"help": "Cap on the retention set's size (a seeded sample)."}
    )

    def __post_init__(self):
        if self.augmentation not in AUGMENTATIONS:
            raise ConfigError(f"augmentation must be one of {', '.join(AUGMENTATIONS)}; got {self.augmentation!r}.")
        if not 0 < self.validation_fraction < 1:
            raise ConfigError(f"validation_fraction must be in (0, 1); got {self.validation_fraction}.")
        for name in ("max_train_samples_per_class", "max_eval_samples", "image_size", "max_retention_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1 when set; got {value}.")


@dataclass
class ImageData:
    """Splits ready for transforms: `train`, `validation` and maybe `test`, with integer labels in `label_column`."""

    splits: DatasetDict
    image_column: str
    label_column: str
    label_names: list[str]
    description: dict = field(default_factory=dict)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.label_names))


def load_image_dataset(args: DataArguments, seed: int = 42) -> ImageData:
    """Load, check and split an image classification dataset (see `DataArguments`)."""
    if not args.dataset_name:
        raise ConfigError("dataset_name is required: a Hub dataset id or a local folder.")
    raw = _load_raw(args)
    train_name = args.train_split
    if train_name not in raw:
        raise ConfigError(f"Split {train_name!r} not found in {args.dataset_name!r}; splits: {sorted(raw)}.")
    image_col = _image_column(raw[train_name], args.image_column)
    label_col, names, raw = _label_column(raw, train_name, args.label_column, assets.resolve(args.dataset_name))

    test_name = _pick_split(raw, args.test_split, ("test",), "test_split")
    val_defaults = tuple(n for n in VALIDATION_NAMES if n != test_name)  # e.g. food101 tests on 'validation'
    val_name = _pick_split(raw, args.validation_split, val_defaults, "validation_split")
    if val_name is not None and val_name in (train_name, test_name):
        raise ConfigError(f"validation_split {val_name!r} is also the train or test split; choose another.")
    splits = {"train": raw[train_name]}
    if test_name:
        splits["test"] = raw[test_name]
    if val_name:
        splits["validation"] = raw[val_name]
    for name, ds in splits.items():
        _check_labels(ds, label_col, len(names), name)
    splits = {name: ds.add_column(ROW, list(range(len(ds)))) for name, ds in splits.items()}
    if not val_name:
        n_train = len(splits["train"])
        n_val = max(math.ceil(args.validation_fraction * n_train), len(names))  # stratified: one per class at least
        if n_train - n_val < len(names):
            raise ConfigError(f"Split {train_name!r} has {n_train} images for {len(names)} classes: too few to carve "
                              "a stratified validation split. Pass validation_split, or more data.")
        carved = splits["train"].train_test_split(test_size=n_val, seed=seed, stratify_by_column=label_col)
        splits["train"], splits["validation"] = carved["train"], carved["test"]
    if args.max_train_samples_per_class:
        splits["train"] = few_shot_subset(splits["train"], label_col, args.max_train_samples_per_class, seed)
    if args.max_eval_samples:
        for name in ("validation", "test"):
            if name in splits and len(splits[name]) > args.max_eval_samples:
                splits[name] = splits[name].shuffle(seed=seed).select(range(args.max_eval_samples))
    splits = {name: ds.cast_column(image_col, Image(decode=False)) for name, ds in splits.items()}
    sources = {"train": train_name, "validation": val_name or train_name, "test": test_name}
    splits, skipped = check_images(splits, image_col, sources, args.skip_bad_images, args.image_check_workers)
    description = {
        "dataset": args.dataset_name, "config": args.dataset_config_name, "revision": args.dataset_revision,
        "splits": {"train": train_name, "validation": val_name or f"{args.validation_fraction:g} of {train_name}",
                   "test": test_name},
        "num_examples": {name: len(ds) for name, ds in splits.items()},
        "num_classes": len(names), "max_train_samples_per_class": args.max_train_samples_per_class,
        "image_column": image_col, "label_column": label_col, "skipped_bad_images": skipped,
    }
    return ImageData(DatasetDict(splits), image_col, label_col, names, description)


def load_evaluation_split(args: DataArguments, split: str | None, seed: int = 42) -> ImageData:
    """One split as is (no carving, no few-shot subset), checked like training data, as `splits["eval"]`.
    `split` None: validation, else test, else train."""
    if not args.dataset_name:
        raise ConfigError("dataset_name is required: a Hub dataset id or a local folder.")
    raw = _load_raw(args)
    split = split or _pick_split(raw, None, ("validation", "test", "train"), "split")
    if split not in raw:
        raise ConfigError(f"Split {split!r} not found in {args.dataset_name!r}; splits: {sorted(raw)}.")
    image_col = _image_column(raw[split], args.image_column)
    label_col, names, raw = _label_column(raw, split, args.label_column, assets.resolve(args.dataset_name))
    ds = raw[split]
    _check_labels(ds, label_col, len(names), split)
    ds = ds.add_column(ROW, list(range(len(ds))))
    if args.max_eval_samples and len(ds) > args.max_eval_samples:
        ds = ds.shuffle(seed=seed).select(range(args.max_eval_samples))
    splits, skipped = check_images({"eval": ds.cast_column(image_col, Image(decode=False))}, image_col,
                                   {"eval": split}, args.skip_bad_images, args.image_check_workers)
    description = {"dataset": args.dataset_name, "config": args.dataset_config_name, "revision": args.dataset_revision,
                   "split": split, "num_examples": len(splits["eval"]), "num_classes": len(names),
                   "image_column": image_col, "label_column": label_col, "skipped_bad_images": skipped}
    return ImageData(DatasetDict(splits), image_col, label_col, names, description)


def _load_raw(args: DataArguments) -> DatasetDict:
    location = assets.resolve(args.dataset_name)  # embedded offline datasets ('hf_l2sp:digits')
    path = Path(location).expanduser()
    if is_local_path(location) and not path.exists():
        raise MissingFileError(f"dataset_name {args.dataset_name!r}: no such folder. Give an existing local folder "
                                "(image folder, parquet repo or save_to_disk output) or a Hub id such as "
                                "'user/dataset'.")
    try:
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            raw = load_from_disk(str(path))
        else:
            raw = load_dataset(location, args.dataset_config_name, revision=args.dataset_revision)
    except (FileNotFoundError, ConnectionError) as err:
        if path.exists():
            raise ConfigError(f"Could not read dataset folder {str(path)!r}: {err}") from err
        hint = ("offline mode is on (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE=1) and it is not cached; run once with "
                "network access, or point dataset_name at a local folder" if datasets_offline()
                else "the Hub could not be reached or has no such dataset; check the id, or use a local folder")
        raise ConfigError(f"Could not load dataset {args.dataset_name!r}: {hint}. "
                          f"({type(err).__name__}: {err})") from err
    return DatasetDict({"train": raw}) if isinstance(raw, Dataset) else raw


def _describe_features(ds: Dataset) -> str:
    return ", ".join(f"{name}: {type(feature).__name__}" for name, feature in ds.features.items())


def _image_column(ds: Dataset, override: str | None) -> str:
    if override:
        if override not in ds.features:
            raise ConfigError(f"image_column {override!r} is not a column. Columns: {_describe_features(ds)}.")
        if not isinstance(ds.features[override], Image):
            raise ConfigError(f"image_column {override!r} is not an Image feature. Columns: {_describe_features(ds)}.")
        return override
    found = [n for n, f in ds.features.items() if isinstance(f, Image)]
    if len(found) != 1:
        what = "no Image column" if not found else f"several Image columns ({', '.join(found)})"
        raise ConfigError(f"Dataset has {what}; set image_column. Columns: {_describe_features(ds)}.")
    return found[0]


def _single_class_hint(source: str | None) -> str:
    """For a local image folder without labels: say how many class folders it has (datasets infers labels only
    from two or more)."""
    folder = Path(source).expanduser() if source else None
    if folder is None or not folder.is_dir():
        return ""
    root = folder / "train" if (folder / "train").is_dir() else folder
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(classes) > 1:
        return ""
    found = f"one class folder ({classes[0]!r})" if classes else "no class folders"
    return (f" {str(root)!r} has {found}: an image folder needs one sub-folder per class, at least two "
            f"(e.g. {str(root)}/cat/1.png, {str(root)}/dog/2.png).")


def _label_column(raw: DatasetDict, train: str, override: str | None,
                  source: str | None = None) -> tuple[str, list[str], DatasetDict]:
    ds = raw[train]
    if override:
        if override not in ds.features:
            raise ConfigError(f"label_column {override!r} is not a column. Columns: {_describe_features(ds)}.")
        col = override
    else:
        found = [n for n, f in ds.features.items() if isinstance(f, ClassLabel)]
        if len(found) > 1:
            raise ConfigError(f"Dataset has several ClassLabel columns ({', '.join(found)}); set label_column. "
                              f"Columns: {_describe_features(ds)}.")
        col = found[0] if found else next((n for n in ("label", "labels") if n in ds.features), None)
        if col is None:
            raise ConfigError(f"Dataset has no label column (no ClassLabel, no 'label'); set label_column. "
                              f"Columns: {_describe_features(ds)}." + _single_class_hint(source))
    feature = ds.features[col]
    if isinstance(feature, ClassLabel):
        return col, list(feature.names), raw
    if not isinstance(feature, Value) or not (feature.dtype.startswith("int") or feature.dtype in ("string",
                                                                                                 "large_string")):
        kind = feature.dtype if isinstance(feature, Value) else type(feature).__name__
        raise ConfigError(f"label_column {col!r} holds {kind}, not class labels: use a ClassLabel, integer or "
                          f"short-string column. Columns: {_describe_features(ds)}.")
    values = sorted({v for split in raw.values() if col in split.features for v in split[col]})
    rows = sum(len(split) for split in raw.values() if col in split.features)
    if not feature.dtype.startswith("int") and len(values) > max(10, rows // 2):
        raise ConfigError(f"label_column {col!r} looks like free text, not class labels: {len(values)} distinct "
                          f"values in {rows} rows (e.g. {values[0]!r}). Choose the column that names each image's "
                          f"class. Columns: {_describe_features(ds)}.")
    names = [str(v) for v in values]
    if feature.dtype.startswith("int"):
        if values and values[0] < 0:
            raise ConfigError(f"label_column {col!r} has negative labels ({values[0]}); labels must be 0..K-1.")
        names = [str(i) for i in range(int(values[-1]) + 1)] if values else []
    class_label = ClassLabel(names=names)
    mapping = {v: class_label.str2int(str(v)) for v in values}
    converted = DatasetDict({
        name: split.map(lambda b: {col: [mapping[v] for v in b[col]]}, batched=True).cast_column(col, class_label)
        if col in split.features else split
        for name, split in raw.items()
    })
    return col, names, converted


def _pick_split(raw: DatasetDict, requested: str | None, defaults: tuple[str, ...], option: str) -> str | None:
    if requested == NO_SPLIT:  # e.g. test_split='none' during a hyperparameter search: never read the test split
        return None
    if requested:
        if requested not in raw:
            raise ConfigError(f"{option} {requested!r} not found; splits: {sorted(raw)}.")
        return requested
    return next((name for name in defaults if name in raw), None)


def _check_labels(ds: Dataset, col: str, num_classes: int, split: str) -> None:
    if col not in ds.features:
        raise ConfigError(f"Split {split!r} has no label column {col!r}. Columns: {_describe_features(ds)}.")
    labels = np.asarray(ds[col])
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise ConfigError(f"Split {split!r} has {bad.size} labels outside 0..{num_classes - 1} "
                          f"(e.g. {sorted(set(bad.tolist()))[:5]}); unlabeled or corrupt rows must be removed.")


def few_shot_subset(ds: Dataset, label_col: str, per_class: int, seed: int) -> Dataset:
    """At most `per_class` rows of each class, drawn with `seed`, in the dataset's order."""
    labels = np.asarray(ds[label_col])
    order = np.random.default_rng(seed).permutation(len(labels))
    taken: dict[int, int] = {}
    keep = []
    for i in order:
        if taken.get(labels[i], 0) < per_class:
            taken[labels[i]] = taken.get(labels[i], 0) + 1
            keep.append(int(i))
    return ds.select(sorted(keep))


def _decode_error(value) -> str | None:
    """None if the image decodes (fully: PIL reads lazily), else what went wrong."""
    try:
        Image().decode_example(value).load()
        return None
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError...)
        return f"{type(err).__name__}: {err}"


def check_images(splits: dict[str, Dataset], image_col: str, sources: dict[str, str], skip: bool,
                 workers: int | None = None) -> tuple[dict[str, Dataset], dict[str, int]]:
    """Decode every image the run will read, before anything is trained or written.

    Each split is scanned with `Dataset.map` (cached by the dataset's fingerprint, so a second run on the same data
    is instant; `workers` processes, default: up to 4 for splits of 2,000 images or more; a progress bar per split).
    A bad image raises one error naming the split, the row (in the original split, `sources[name]`) and the column;
    with `skip`, bad rows are dropped and counted per split.
    """
    kept, skipped = {}, {}
    for name, ds in splits.items():
        procs = workers if workers is not None else (min(4, os.cpu_count() or 1) if len(ds) >= 2000 else None)
        errors = ds.map(lambda batch: {"__error__": [_decode_error(x) for x in batch[image_col]]},
                        batched=True, num_proc=procs if procs and procs > 1 else None,
                        desc=f"Checking images ({name})")["__error__"]
        bad = [i for i, err in enumerate(errors) if err is not None]
        if bad and not skip:
            row = ds[bad[0]][ROW]
            more = f" ({len(bad) - 1} more in this split)" if len(bad) > 1 else ""
            raise ConfigError(f"Cannot decode the image in row {row} of split {sources.get(name, name)!r}, column "
                              f"{image_col!r} ({errors[bad[0]]}){more}. Fix or remove it, or pass --skip_bad_images "
                              "true to drop such rows.")
        if bad:
            logger.warning("hf_l2sp: dropped %d undecodable image(s) from split %r.", len(bad), name)
            ds = ds.select(sorted(set(range(len(ds))) - set(bad)))
        kept[name], skipped[name] = ds, len(bad)
    return kept, skipped
