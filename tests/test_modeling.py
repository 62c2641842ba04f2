"""load_backbone: every source format, a fresh head, and a loud refusal of partly random backbones."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_l2sp.loading.models import data_config_of, load_backbone

from .helpers import save_timm_folder, timm_classifier, vit_classifier

LABELS = {0: "ant", 1: "bee", 2: "cat"}


def assert_backbone_equal(model, reference_state, skip=("fc.",)):
    state = {k.removeprefix("timm_model."): v for k, v in model.state_dict().items()}
    for key, value in reference_state.items():
        if not key.startswith(skip):
            assert torch.equal(state[key], value), key


def test_timm_folder_as_timm_writes_it(tmp_path):
    source = save_timm_folder(tmp_path / "src", num_classes=5)
    assert "num_classes" in json.loads((tmp_path / "src" / "config.json").read_text())["model_args"]
    model, report = load_backbone(str(tmp_path / "src"), LABELS)
    assert type(model).__name__ == "TimmWrapperForImageClassification"
    assert_backbone_equal(model, source.state_dict())
    assert model.config.id2label == LABELS and model.timm_model.fc.out_features == 3
    assert report.kind == "timm" and report.head_modules == ["timm_model.fc"]
    assert report.new_tensor_names == ["timm_model.fc.bias", "timm_model.fc.weight"]
    assert report.new_parameters == 3 * source.fc.in_features + 3
    total = sum(p.numel() for p in model.parameters())
    assert report.pretrained_parameters + report.new_parameters == total


def test_transformers_saved_timm_wrapper_and_same_head_size(tmp_path):
    source = timm_classifier(num_labels=3)
    source.save_pretrained(tmp_path / "hf")
    model, report = load_backbone(f"local-dir:{tmp_path / 'hf'}", LABELS)
    assert_backbone_equal(model, {k.removeprefix("timm_model."): v for k, v in source.state_dict().items()}, skip=())
    assert report.new_tensors == 0  # same head shape: the checkpoint's head is pretrained too


def test_native_transformers_checkpoint(tmp_path):
    source = vit_classifier(num_labels=5)
    source.save_pretrained(tmp_path / "vit")
    model, report = load_backbone(str(tmp_path / "vit"), LABELS)
    assert report.kind == "transformers" and report.head_modules == ["classifier"]
    assert report.new_tensor_names == ["classifier.bias", "classifier.weight"]
    torch.testing.assert_close(model.vit.embeddings.patch_embeddings.projection.weight,
                               source.vit.embeddings.patch_embeddings.projection.weight)
    assert data_config_of(model)["input_size"][-1] > 0


def test_incomplete_weights_are_refused_naming_keys(tmp_path):
    save_timm_folder(tmp_path / "src")
    state = load_file(str(tmp_path / "src" / "model.safetensors"))
    del state["layer1.0.conv1.weight"]
    save_file(state, str(tmp_path / "src" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"do not fit timm 'test_resnet': missing: layer1.0.conv1.weight. Refusing"):
        load_backbone(str(tmp_path / "src"), LABELS)


def test_wrong_architecture_weights_are_refused(tmp_path):
    save_timm_folder(tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    config["architecture"] = "resnet10t"
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"do not fit timm 'resnet10t': missing: .*mismatched: "):
        load_backbone(str(tmp_path / "src"), LABELS)


@pytest.mark.parametrize("name, match", [
    ("timm/resnet50.a1_in1k", r"Could not load model 'timm/resnet50.a1_in1k': .*HF_HUB_OFFLINE=1 is set"),
    ("resnet18.a1_in1k", r"Could not load model 'resnet18.a1_in1k': .*HF_HUB_OFFLINE=1 is set"),
    ("no_such_net", r"'no_such_net' is not a local folder, a Hub id .* or a timm model name"),
])
def test_unloadable_names_give_clear_errors(name, match):
    with pytest.raises((OSError, ValueError), match=match):
        load_backbone(name, LABELS)


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_backbone(str(tmp_path / "empty"), LABELS)
