"""A checkpoint made by `hf-l2sp train` loads through timm, transformers, the image processor and the pipeline."""

import json

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

from hf_l2sp.cli import main
from hf_l2sp.artefacts.drift import compute_drift

from .helpers import pil_images, save_timm_folder, write_parquet_repo


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A few steps of real training through the CLI, at 48 px with the paper's squash-crop evaluation."""
    root = tmp_path_factory.mktemp("trained")
    source = save_timm_folder(root / "model", num_classes=7)
    write_parquet_repo(root / "data", splits={"train": 24, "test": 6}, names=["ant", "bee", "cat"])
    flags = ["--model_name_or_path", str(root / "model"), "--dataset_name", str(root / "data"),
             "--output_dir", str(root / "out"), "--image_size", "48", "--augmentation", "paper", "--max_steps", "3",
             "--per_device_train_batch_size", "4", "--learning_rate", "0.05", "--optim", "sgd", "--use_cpu", "true",
             "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", "--sp_alpha", "0.5",
             "--dataloader_num_workers", "0"]
    assert main(["train", *flags]) == 0
    return root, source


def reference_logits(folder, images):
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    with torch.no_grad():
        return model(**processor(images, return_tensors="pt")).logits, model, processor


def test_four_loaders_give_the_same_logits_and_labels(trained):
    root, _ = trained
    folder = str(root / "out")
    images = pil_images(3, size=60, seed=5)
    logits, model, processor = reference_logits(folder, images)
    assert model.config.id2label == {0: "ant", 1: "bee", 2: "cat"}
    pixels = processor(images, return_tensors="pt")["pixel_values"]
    assert pixels.shape[-1] == 48  # the processor reproduces the training evaluation size, not timm's default

    timm_model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(timm_model(pixels), logits)
    assert timm_model.pretrained_cfg["label_names"] == ["ant", "bee", "cat"]
    # timm's own preprocessing from the saved config is the training evaluation transform
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(timm_model))
    torch.testing.assert_close(torch.stack([transform(im) for im in images]), pixels)

    classify = pipeline("image-classification", model=folder, top_k=3)
    for image, row in zip(images, logits.softmax(-1)):
        predictions = {p["label"]: p["score"] for p in classify(image)}
        expected = {model.config.id2label[i]: row[i].item() for i in range(3)}
        assert predictions.keys() == expected.keys()
        for label in expected:
            assert predictions[label] == pytest.approx(expected[label], abs=1e-5)


def test_saved_weights_are_timm_native_and_the_config_is_clean(trained):
    root, _ = trained
    keys = load_file(str(root / "out" / "model.safetensors")).keys()
    assert not any(k.startswith("timm_model.") for k in keys) and "fc.weight" in keys
    config = json.loads((root / "out" / "config.json").read_text())
    assert isinstance(config["model_args"], dict) and "num_classes" not in config["model_args"]
    assert config["pretrained_cfg"]["input_size"] == [3, 48, 48]
    assert config["pretrained_cfg"]["crop_mode"] == "squash"


def test_drift_json_matches_a_direct_computation(trained):
    root, source = trained
    drift = json.loads((root / "out" / "drift.json").read_text())
    weights = load_file(str(root / "out" / "model.safetensors"))
    start = source.state_dict()
    layers = {row["name"]: row for row in drift["layers"]}
    assert "timm_model.fc.weight" not in layers  # the new head has no anchor
    total = 0.0
    for key, w in weights.items():
        name = f"timm_model.{key}"
        if name in layers:
            d = (w.float() - start[key].float()).norm().item()
            assert layers[name]["distance"] == pytest.approx(d, rel=1e-5, abs=1e-7)
            norm = start[key].float().norm().item()  # zero for BN biases initialised at 0
            expected = d / norm if norm > 0 else None
            assert layers[name]["relative_distance"] == (pytest.approx(expected, rel=1e-5, abs=1e-7)
                                                         if expected is not None else None)
            total += d ** 2
    assert drift["total"]["distance"] == pytest.approx(np.sqrt(total), rel=1e-5)
    assert {s["stage"] for s in drift["stages"]} >= {"layer1", "layer4"}
    assert (root / "out" / "drift.png").stat().st_size > 1000
    assert any(row["penalised"] for row in layers.values()) and not all(row["penalised"] for row in layers.values())


def test_stage_grouping_of_a_synthetic_drift():
    from .helpers import timm_classifier
    from hf_l2sp import Reference

    model = timm_classifier("test_resnet")
    reference = Reference.snapshot(model, ["timm_model.fc"])
    with torch.no_grad():
        model.timm_model.layer2[0].conv1.weight.add_(1.0)
    drift = compute_drift(model, reference.tensors)
    moved = {s["stage"]: s["distance"] for s in drift["stages"]}
    assert moved["layer2"] > 0 and all(v == 0 for k, v in moved.items() if k != "layer2")


def test_loading_weights_that_do_not_match_the_config_names_keys(trained, tmp_path):
    root, _ = trained
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json",):
        (broken / name).write_text((root / "out" / name).read_text())
    state = load_file(str(root / "out" / "model.safetensors"))
    del state["layer1.0.conv1.weight"]
    save_file(state, str(broken / "model.safetensors"))
    from hf_l2sp.loading.models import load_backbone

    with pytest.raises(ValueError, match="missing: layer1.0.conv1.weight"):
        load_backbone(str(broken), {0: "a", 1: "b"})
