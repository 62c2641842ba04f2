"""Image dataset loading on local stand-ins shaped like Hub datasets."""

import io
from collections import Counter

import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

from hf_l2sp.loading.data import DataArguments, load_image_dataset
from hf_l2sp.loading.transforms import build_transforms, collate_images, with_transforms

from .helpers import pil_images, write_image_folder, write_parquet_repo


def load(path, **kwargs):
    return load_image_dataset(DataArguments(dataset_name=str(path), **kwargs), seed=0)


def test_parquet_repo_with_unusual_column_names(tmp_path):
    data = load(write_parquet_repo(tmp_path))
    assert (data.image_column, data.label_column) == ("picture", "category")
    assert data.label_names == ["c0", "c1", "c2"]
    assert set(data.splits) == {"train", "validation", "test"}
    assert len(data.splits["train"]) + len(data.splits["validation"]) == 30 and len(data.splits["test"]) == 9
    assert Counter(data.splits["validation"]["category"]) == {0: 1, 1: 1, 2: 1}  # stratified carve, 10 %


def test_imagefolder_labels_and_modes_become_rgb(tmp_path):
    data = load(write_image_folder(tmp_path), validation_fraction=0.25)
    assert data.label_names == ["cat", "dog"]
    train_tf, eval_tf, _ = build_transforms({"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3,
                                             "interpolation": "bilinear", "crop_pct": 1.0}, "none")
    splits = with_transforms(data, train_tf, eval_tf)
    batch = collate_images([splits["test"][i] for i in range(len(splits["test"]))])
    assert batch["pixel_values"].shape == (8, 3, 16, 16)  # grayscale (cat) and RGBA (dog) both became RGB
    assert batch["labels"].tolist() == data.splits["test"]["label"]


def test_save_to_disk_folder_and_overrides(tmp_path):
    features = Features({"a": Image(), "b": Image(), "y": ClassLabel(names=["no", "yes"])})
    ds = Dataset.from_dict({"a": pil_images(6), "b": pil_images(6, seed=1), "y": [0, 1] * 3}, features=features)
    DatasetDict({"train": ds, "validation": ds}).save_to_disk(str(tmp_path / "disk"))
    with pytest.raises(ValueError, match=r"several Image columns \(a, b\); set image_column. Columns: a: Image, "
                                         r"b: Image, y: ClassLabel"):
        load(tmp_path / "disk")
    data = load(tmp_path / "disk", image_column="b")
    assert data.image_column == "b" and len(data.splits["validation"]) == 6 and "test" not in data.splits
    with pytest.raises(ValueError, match="image_column 'y' is not an Image feature"):
        load(tmp_path / "disk", image_column="y")
    with pytest.raises(ValueError, match="label_column 'z' is not a column"):
        load(tmp_path / "disk", image_column="a", label_column="z")


def test_string_labels_get_sorted_names_and_missing_labels_are_named(tmp_path):
    string_feature = Dataset.from_dict({"k": ["a"]}).features["k"]
    ds = Dataset.from_dict({"image": pil_images(6), "kind": ["zebra", "ant", "moth"] * 2},
                           features=Features({"image": Image(), "kind": string_feature}))
    ds.save_to_disk(str(tmp_path / "strings"))
    data = load(tmp_path / "strings", label_column="kind", validation_fraction=0.5)
    assert data.label_names == ["ant", "moth", "zebra"]
    assert sorted(set(data.splits["train"]["kind"])) == [0, 1, 2]
    Dataset.from_dict({"image": pil_images(2)}, features=Features({"image": Image()})).save_to_disk(
        str(tmp_path / "nolabel"))
    with pytest.raises(ValueError, match="no label column .*set label_column. Columns: image: Image"):
        load(tmp_path / "nolabel")


def test_labels_out_of_range_are_refused(tmp_path):
    ds = Dataset.from_dict({"image": pil_images(4), "label": [0, 1, 2, 1]},
                           features=Features({"image": Image(), "label": ClassLabel(names=["a", "b", "c"])}))
    bad = Dataset.from_dict({"image": pil_images(2), "label": [1, -1]},
                            features=Features({"image": Image(), "label": ClassLabel(names=["a", "b", "c"])}))
    DatasetDict({"train": ds, "test": bad}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(ValueError, match=r"Split 'test' has 1 labels outside 0..2 \(e.g. \[-1\]\)"):
        load(tmp_path / "d", validation_fraction=0.5)


@pytest.mark.parametrize("per_class", [1, 3, 7])
def test_few_shot_subset_is_stratified_and_seeded(tmp_path, per_class):
    path = write_parquet_repo(tmp_path, splits={"train": 60, "validation": 6})
    data = load(path, max_train_samples_per_class=per_class)
    counts = Counter(data.splits["train"]["category"])
    assert counts == {c: min(per_class, 20) for c in range(3)}
    again = load(path, max_train_samples_per_class=per_class)
    assert data.splits["train"]["__row__"] == again.splits["train"]["__row__"]
    other = load_image_dataset(DataArguments(dataset_name=path, max_train_samples_per_class=per_class), seed=1)
    assert other.splits["train"]["__row__"] != data.splits["train"]["__row__"]


def test_transforms_follow_the_model_data_config():
    """Eval transform equals timm's own create_transform for that config; training differs (augmentation)."""
    from timm.data import create_transform

    config = {"input_size": (3, 24, 24), "mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6),
              "interpolation": "bicubic", "crop_pct": 0.875}
    image = pil_images(1, size=40)[0]
    train_tf, eval_tf, eval_config = build_transforms(config, "timm")
    torch.testing.assert_close(eval_tf(image), create_transform(**config, is_training=False)(image))
    assert eval_config == config and train_tf(image).shape == (3, 24, 24)
    _, small, small_config = build_transforms(config, "timm", image_size=16)
    assert small(image).shape == (3, 16, 16) and small_config["input_size"] == (3, 16, 16)
    paper_train, paper_eval, paper_config = build_transforms(config, "paper")
    assert paper_train(image).shape == paper_eval(image).shape == (3, 24, 24)
    # the saved config reproduces the paper's eval transform: warp to 27x27 (24 / 0.875), centre 24 crop
    torch.testing.assert_close(paper_eval(image), create_transform(**paper_config, is_training=False)(image))
    assert paper_config["crop_mode"] == "squash"


def test_undecodable_image_is_refused_before_training_or_skipped(tmp_path):
    """Every image of every split the run reads is decoded up front; the error names split, row and column."""
    good = io.BytesIO()
    pil_images(1)[0].save(good, format="PNG")
    rows = [{"bytes": good.getvalue(), "path": None}] * 5 + [{"bytes": b"not an image", "path": None}]
    ds = Dataset.from_dict({"image": rows, "label": [0, 1, 0, 1, 0, 1]},
                           features=Features({"image": Image(decode=False), "label": ClassLabel(names=["a", "b"])}))
    DatasetDict({"train": ds.select(range(5)), "test": ds}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(ValueError, match=r"Cannot decode the image in row 5 of split 'test', column 'image' "
                                         r"\(UnidentifiedImageError: .*\)\. .*--skip_bad_images true"):
        load(tmp_path / "d", validation_fraction=0.3)
    skipped = load(tmp_path / "d", validation_fraction=0.3, skip_bad_images=True)
    assert skipped.description["skipped_bad_images"] == {"train": 0, "validation": 0, "test": 1}
    assert len(skipped.splits["test"]) == 5


def test_bad_training_image_stops_the_cli_before_anything_is_written(tmp_path, capsys):
    """A corrupt image at row 7 of train: `hf-l2sp train` ends with one line and leaves no output folder."""
    from hf_l2sp.cli import main

    from .helpers import save_timm_folder

    good = io.BytesIO()
    pil_images(1)[0].save(good, format="PNG")
    rows = [{"bytes": good.getvalue(), "path": None}] * 12
    rows[7] = {"bytes": b"\x89PNG broken", "path": None}
    ds = Dataset.from_dict({"image": rows, "label": [i % 2 for i in range(12)]},
                           features=Features({"image": Image(), "label": ClassLabel(names=["a", "b"])}))
    DatasetDict({"train": ds, "test": ds.select(range(4))}).save_to_disk(str(tmp_path / "d"))
    save_timm_folder(tmp_path / "m", num_classes=2)
    out = tmp_path / "run"
    code = main(["train", "--model_name_or_path", str(tmp_path / "m"), "--dataset_name", str(tmp_path / "d"),
                 "--output_dir", str(out), "--max_steps", "4", "--use_cpu", "true", "--report_to", "none",
                 "--image_size", "32", "--validation_fraction", "0.25"])
    assert code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]  # not progress bars
    assert len(err) == 1 and err[0].startswith("hf-l2sp train: error: Cannot decode the image in row 7 of split "
                                               "'train', column 'image'")
    assert not out.exists()


def test_unreachable_hub_dataset_says_offline_mode_is_on():
    with pytest.raises(ValueError, match=r"Could not load dataset 'someone/not-cached': offline mode is on"):
        load("someone/not-cached")


@pytest.mark.parametrize("kwargs, match", [({"augmentation": "heavy"}, "augmentation must be one of timm, paper"),
                                           ({"validation_fraction": 1.5}, r"validation_fraction must be in \(0, 1\)"),
                                           ({"max_train_samples_per_class": 0}, "must be >= 1")])
def test_bad_data_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DataArguments(dataset_name="x", **kwargs)
