"""Parameter names under wrappers, head detection, and reference files in either naming."""

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from hf_l2sp import Reference
from hf_l2sp.loading.model_parts import canonical_name, find_head_modules
from hf_l2sp.anchor.parameters import resolve_parameters

from .helpers import timm_classifier, vit_classifier


@pytest.mark.parametrize("name, expected", [
    ("module.timm_model.fc.weight", "timm_model.fc.weight"),
    ("_orig_mod.module.conv.weight", "conv.weight"),
    ("_fsdp_wrapped_module.layer1._checkpoint_wrapped_module.conv.weight", "layer1.conv.weight"),
    ("modules.0.weight", "modules.0.weight"),  # only whole path components are wrapper names
])
def test_canonical_name(name, expected):
    assert canonical_name(name) == expected


@pytest.mark.parametrize("architecture, head", [("test_resnet", "timm_model.fc"),
                                                ("test_convnext", "timm_model.head.fc"),
                                                ("mobilenetv3_small_050", "timm_model.classifier")])
def test_timm_head_from_pretrained_cfg(architecture, head):
    assert find_head_modules(timm_classifier(architecture)) == [head]


def test_native_head_and_unknown_module():
    assert find_head_modules(vit_classifier()) == ["classifier"]
    with pytest.raises(ValueError, match="Could not find the classification head of Sequential. Set sp_head"):
        find_head_modules(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))


@pytest.mark.parametrize("wrap", [lambda m: nn.DataParallel(m), lambda m: torch.compile(m)], ids=["dp", "compile"])
def test_parameter_sets_survive_wrappers(wrap):
    model = timm_classifier()
    reference = Reference.snapshot(model, find_head_modules(model))
    plain = resolve_parameters(model, reference.tensors, "weights")
    wrapped = wrap(model)
    assert find_head_modules(wrapped) == ["timm_model.fc"]
    sets = resolve_parameters(wrapped, reference.tensors, "weights")
    assert sets.anchored_names == plain.anchored_names and sets.head_names == plain.head_names
    assert all(a is b for a, b in zip(sets.anchored, plain.anchored))


def test_reference_file_in_timm_naming_matches_wrapper_naming(tmp_path):
    """A timm-format file has no 'timm_model.' prefix; it must line up with TimmWrapper parameter names."""
    model = timm_classifier()
    state = {k: v.clone() for k, v in model.timm_model.state_dict().items() if not k.startswith("fc.")}
    save_file(state, str(tmp_path / "model.safetensors"))
    loaded = Reference.from_checkpoint(str(tmp_path), model, ["timm_model.fc"])
    snap = Reference.snapshot(model, ["timm_model.fc"])
    assert loaded.tensors.keys() == snap.tensors.keys()
    assert loaded.fingerprint() == snap.fingerprint()


def test_reference_missing_path_and_offline_hub(tmp_path):
    model = timm_classifier()
    with pytest.raises(FileNotFoundError, match="neither a file, a folder nor a Hub repo id"):
        Reference.from_checkpoint(str(tmp_path / "nope" / "deeper"), model, ["timm_model.fc"])
    with pytest.raises(OSError,
                       match=r"Could not load sp_reference 'timm/resnet50.a1_in1k': .*HF_HUB_OFFLINE=1 is set"):
        Reference.from_checkpoint("timm/resnet50.a1_in1k", model, ["timm_model.fc"])
    with pytest.raises(FileNotFoundError, match=r"No weights file"):
        Reference.from_checkpoint(str(tmp_path), model, ["timm_model.fc"])


def test_checkpoint_key_lists_line_up_where_transformers_renames_modules(tmp_path):
    """transformers 5 saves ViT's `layers` as `encoder.layer`: the S / new rule, sp_reference and the resume check
    compare with the names the checkpoint really uses (`parameter_layouts`), not the module names."""
    from transformers import AutoModelForImageClassification

    from hf_l2sp import SPTrainer
    from hf_l2sp.loading.checkpoint_layout import parameter_layouts

    from .helpers import sp_config, tensor_dataset, vit_classifier

    vit_classifier(image_size=32).save_pretrained(tmp_path / "vit")
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "vit")
    layout = parameter_layouts(model)["vit.layers.0.mlp.fc1.weight"]
    assert layout.forms == [{"encoder.layer.0.intermediate.dense.weight": (32, 16)}] and not layout.converted
    trainer = SPTrainer(model=model, args=sp_config(tmp_path, sp_include="all",
                                                    sp_reference=str(tmp_path / "vit")),
                        train_dataset=tensor_dataset(4))
    new = trainer.sp.new_tensors
    assert new.checkpoint is not None and new.from_checkpoint == []  # the key list was used, and everything lines up
    assert set(new.names) == {"classifier.weight", "classifier.bias"}
    # sp_reference read the same file by its saved names (before, every renamed key was "not in the model")
    assert trainer.sp_reference.source == str(tmp_path / "vit")
    assert {n for n in trainer.sp_parameters().anchored_names if ".layers." in n}
