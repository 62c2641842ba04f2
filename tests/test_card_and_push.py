"""Model cards (content, metadata, no secrets) and pushes tested at the huggingface_hub boundary."""

import fnmatch
import json
import os
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard

from hf_l2sp import SPTrainer
from hf_l2sp.cli import main

from .helpers import save_timm_folder, sp_config, tensor_dataset, timm_classifier, write_parquet_repo

SECRET = "hf_SECRETtoken0123456789"


def run_flags(root, **overrides):
    if not (root / "model").exists():
        save_timm_folder(root / "model", num_classes=7)
        write_parquet_repo(root / "data", splits={"train": 24, "test": 6})
    flags = {"model_name_or_path": str(root / "model"), "dataset_name": str(root / "data"),
             "output_dir": str(root / "secret-machine-dir" / "out"), "image_size": "32", "max_steps": "2",
             "per_device_train_batch_size": "4", "optim": "sgd", "use_cpu": "true", "report_to": "none",
             "save_strategy": "no", "disable_tqdm": "true", "dataloader_num_workers": "0", "sp_alpha": "0.05",
             "hub_token": SECRET}
    flags.update(overrides)
    return [x for k, v in flags.items() for x in (f"--{k}", str(v))]


class FakeHub:
    """Records what would reach the Hub: repo creation and the exact files of each folder upload."""

    def __init__(self, monkeypatch, fail=None):
        self.repos, self.uploads, self.fail = [], [], fail
        hub = self

        def create_repo(api, repo_id, *args, **kwargs):
            if hub.fail:
                raise hub.fail
            hub.repos.append(repo_id)
            return type("RepoUrl", (), {"repo_id": repo_id})()

        def upload_folder(api, *, repo_id, folder_path, ignore_patterns=None, **kwargs):
            if hub.fail:
                raise hub.fail
            files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
            kept = [f for f in files if not any(fnmatch.fnmatch(f, pat) or fnmatch.fnmatch(f.split("/")[0], pat)
                                                for pat in ignore_patterns or [])]
            hub.uploads.append({"repo_id": repo_id, "files": kept,
                                "card": (Path(folder_path) / "README.md").read_text()})
            return type("CommitInfo", (), {"commit_url": f"https://hub/{repo_id}/commit/1"})()

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)


def test_card_holds_formula_coefficients_metrics_citation_and_no_secrets(tmp_path):
    assert main(["train", *run_flags(tmp_path, sp_reference=str(tmp_path / "model"))]) == 0
    out = tmp_path / "secret-machine-dir" / "out"
    text = (out / "README.md").read_text()
    for expected in ("Omega(w) = alpha/2 * ||w_S - w0_S||^2 + beta/2 * ||w_new||^2", "| alpha (pretrained tensors S) "
                     "| 0.05 |", "| beta (new tensors) | 0.01 |", "conv, linear and embedding layers only",
                     "loaded from local folder 'model'", "| test | accuracy |", "| validation | accuracy |",
                     "@inproceedings{li2018explicit", "- transformers ", "- timm ", "drift.png", "| max_steps | `2` |",
                     'timm.create_model("local-dir:out"'):
        assert expected in text, expected
    for secret in (SECRET, "secret-machine-dir", str(tmp_path), "/tmp"):
        assert secret not in text
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "timm" and card.data.pipeline_tag == "image-classification"
    assert "regularizer:l2_sp" in card.data.tags
    results = {(r.dataset_split, r.metric_type) for r in card.data.eval_results}
    assert ("test", "accuracy") in results and ("validation", "accuracy") in results
    assert card.data.base_model is None  # a local folder is never published as base_model


RUN_ARTEFACTS = {"README.md", "drift.json", "drift.png", "sp_config.json"}
RESUME_FILES = {"model.safetensors", "sp_anchor.safetensors", "sp_checkpoint_complete.json"}


def native_resnet():
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    return ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                     num_labels=3))


@pytest.mark.parametrize("make_model", [timm_classifier, native_resnet], ids=["timm_wrapper", "native_resnet"])
def test_artefacts_are_written_by_the_final_save_and_checkpoints_keep_what_resuming_needs(tmp_path, monkeypatch,
                                                                                          make_model):
    import hf_l2sp.artefacts.trainer as saving

    calls = []
    real = saving.compute_drift
    monkeypatch.setattr(saving, "compute_drift", lambda *a, **k: calls.append(1) or real(*a, **k))
    args = sp_config(tmp_path, max_steps=2, save_strategy="steps", save_steps=1, regularizer="l2")
    trainer = SPTrainer(model=make_model(), args=args, train_dataset=tensor_dataset(8))
    trainer.train()
    for step in (1, 2):
        files = set(os.listdir(tmp_path / "out" / f"checkpoint-{step}"))
        assert RESUME_FILES <= files and not RUN_ARTEFACTS & files
    assert calls == []  # no drift computed during training
    trainer.save_model()
    trainer.save_model()  # a second final save of the same step writes nothing new
    assert RUN_ARTEFACTS <= set(os.listdir(tmp_path / "out"))
    assert calls == [1]
    assert "Omega(w) = alpha/2 * ||w_S||^2" in (tmp_path / "out" / "README.md").read_text()


def test_checkpoint_artefacts_when_asked(tmp_path):
    args = sp_config(tmp_path, max_steps=2, save_strategy="steps", save_steps=1, regularizer="l2",
                     sp_checkpoint_artefacts=True)
    SPTrainer(model=timm_classifier(), args=args, train_dataset=tensor_dataset(8)).train()
    for step in (1, 2):
        folder = tmp_path / "out" / f"checkpoint-{step}"
        assert RESUME_FILES | RUN_ARTEFACTS <= set(os.listdir(folder))
        assert "Omega(w) = alpha/2 * ||w_S||^2" in (folder / "README.md").read_text()


def test_push_hands_over_exactly_the_run_files(tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch)
    assert main(["train", *run_flags(tmp_path, push_to_hub="true", hub_model_id="me/lite-l2sp")]) == 0
    (upload,) = hub.uploads
    assert hub.repos == ["me/lite-l2sp"] and upload["repo_id"] == "me/lite-l2sp"
    assert {"model.safetensors", "config.json", "README.md", "drift.json", "drift.png", "sp_config.json",
            "all_results.json"} <= set(upload["files"])
    assert not any(f.startswith("checkpoint-") for f in upload["files"])
    assert 'timm.create_model("hf-hub:me/lite-l2sp"' in upload["card"] and "| test | accuracy |" in upload["card"]
    assert SECRET not in upload["card"]


def test_failed_push_keeps_the_local_output_and_says_so(tmp_path, monkeypatch, capsys):
    FakeHub(monkeypatch, fail=ConnectionError("network is unreachable"))
    assert main(["train", *run_flags(tmp_path, push_to_hub="true", hub_model_id="me/x")]) == 2
    err = capsys.readouterr().err
    assert "Could not push" in err and "local output is complete and unchanged" in err and "hf-l2sp push" in err
    out = tmp_path / "secret-machine-dir" / "out"
    assert {"model.safetensors", "README.md", "all_results.json"} <= set(os.listdir(out))


def test_push_command_for_a_finished_folder(tmp_path, monkeypatch, capsys):
    assert main(["train", *run_flags(tmp_path)]) == 0
    out = tmp_path / "secret-machine-dir" / "out"
    hub = FakeHub(monkeypatch)
    assert main(["push", str(out), "--repo_id", "team/digits"]) == 0
    (upload,) = hub.uploads
    assert upload["repo_id"] == "team/digits" and "model.safetensors" in upload["files"]
    assert 'from_pretrained("team/digits")' in upload["card"] and '"hf-hub:team/digits"' in upload["card"]
    hub.fail = PermissionError("401 Unauthorized: invalid token")
    before = {name: (out / name).read_bytes() for name in os.listdir(out) if (out / name).is_file()}
    assert main(["push", str(out), "--repo_id", "team/other"]) == 2
    assert "no valid Hugging Face credentials" in capsys.readouterr().err
    after = {name: (out / name).read_bytes() for name in os.listdir(out) if (out / name).is_file()}
    assert after == before and b"team/other" not in after["README.md"]  # a failed push changes nothing (22j)
    assert main(["push", str(tmp_path), "--repo_id", "team/digits"]) == 2
    assert "is not a finished hf-l2sp output folder" in capsys.readouterr().err


@pytest.mark.parametrize("regularizer", ["l2", "l1_sp", "group_lasso_sp", "none"])
def test_card_names_each_regularizer(tmp_path, regularizer):
    from hf_l2sp import get_regularizer_class

    model = timm_classifier()
    trainer = SPTrainer(model=model, args=sp_config(tmp_path, regularizer=regularizer, max_steps=1),
                        train_dataset=tensor_dataset(4))
    trainer.train()
    trainer.save_model()
    text = (tmp_path / "out" / "README.md").read_text()
    assert get_regularizer_class(regularizer).formula in text and f"`{regularizer}`" in text


def test_a_script_trained_native_model_records_its_evaluation_transform(tmp_path):
    """Issue 22f beside the README's TimmWrapper quick start: a native transformers classifier trained from a
    script through build_transforms + with_transforms records the 40 px evaluation transform and its data."""
    from transformers import ResNetConfig, ResNetForImageClassification

    from hf_l2sp import (DataArguments, SPTrainer, build_transforms, collate_images, data_config_of,
                         load_image_dataset, with_transforms)
    from hf_l2sp.loading.models import EVAL_DATA_CONFIG

    from .helpers import sp_config, write_parquet_repo

    data = load_image_dataset(DataArguments(dataset_name=write_parquet_repo(tmp_path / "data")))
    labels = data.id2label
    model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                      num_labels=len(labels), id2label=labels,
                                                      label2id={v: k for k, v in labels.items()}))
    transforms = build_transforms(data_config_of(model), augmentation="none", image_size=40)
    splits = with_transforms(data, transforms.train, transforms.eval)
    trainer = SPTrainer(model=model, args=sp_config(tmp_path, max_steps=1), train_dataset=splits["train"],
                        eval_dataset=splits["validation"], data_collator=collate_images)
    trainer.train()
    trainer.save_model()
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config[EVAL_DATA_CONFIG]["input_size"] == [3, 40, 40]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "a user-provided dataset" not in card and "`?`" not in card
