"""Credentials never reach a file a run writes nor an upload: a fake token given as an argument, in the environment
and as a CLI flag appears in no byte of the output folder (checkpoints included), and every upload path refuses a
folder in which a file holds the token in use or anything shaped like a Hugging Face token."""

import copy
import os
from pathlib import Path

import pytest
import torch

from hf_l2sp import SPTrainer
from hf_l2sp.cli import main
from hf_l2sp.utils.secrets import SecretInUploadError, check_upload

from .helpers import sp_config, tensor_dataset, timm_classifier
from .test_card_and_push import FakeHub, run_flags

TOKEN = "hf_" + "FakeToken0123456789" * 2  # shaped like a real one


def bytes_of(folder: Path) -> list[tuple[str, bytes]]:
    return [(str(p), p.read_bytes()) for p in Path(folder).rglob("*") if p.is_file()]


def assert_nowhere(token: str, folder: Path) -> None:
    files = bytes_of(folder)
    assert len(files) > 5
    assert [name for name, data in files if token.encode() in data] == []


@pytest.mark.parametrize("given", ["argument", "environment"])
def test_a_token_reaches_no_file_of_the_run_and_the_live_arguments_keep_it(tmp_path, monkeypatch, given):
    if given == "environment":
        monkeypatch.setenv("HF_TOKEN", TOKEN)
    args = sp_config(tmp_path, max_steps=2, save_strategy="steps", save_steps=1,
                     hub_token=TOKEN if given == "argument" else None)
    trainer = SPTrainer(model=timm_classifier(), args=args, train_dataset=tensor_dataset(8))
    trainer.train()
    trainer.save_model()
    assert_nowhere(TOKEN, tmp_path / "out")
    saved = torch.load(tmp_path / "out" / "checkpoint-1" / "training_args.bin", weights_only=False)
    assert saved.hub_token is None and saved.sp_alpha == args.sp_alpha and saved.max_steps == 2
    if given == "argument":
        assert trainer.args.hub_token == TOKEN and copy.deepcopy(args).hub_token == TOKEN
        assert copy.copy(args).hub_token == TOKEN


def test_a_token_given_as_a_cli_flag_reaches_no_file(tmp_path):
    assert main(["train", *run_flags(tmp_path, hub_token=TOKEN, save_strategy="steps", save_steps="1")]) == 0
    assert_nowhere(TOKEN, tmp_path / "secret-machine-dir" / "out")


def test_every_upload_path_refuses_a_folder_holding_a_token(tmp_path, monkeypatch, capsys):
    hub = FakeHub(monkeypatch)
    assert main(["train", *run_flags(tmp_path, hub_token=TOKEN)]) == 0
    out = tmp_path / "secret-machine-dir" / "out"
    check_upload(out, ["_*", "checkpoint-*"], [TOKEN])  # the run's own files are clean
    (out / "notes.txt").write_text(f"login with {TOKEN}\n")
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the token `hf-l2sp push` would upload with
    assert main(["push", str(out), "--repo_id", "team/x"]) == 2
    assert "Refusing to upload" in (err := capsys.readouterr().err) and "notes.txt holds the token in use" in err
    assert hub.uploads == [] and hub.repos == []

    other = "hf_" + "SomebodyElse987654321" * 2  # not the token in use, but shaped like one
    (out / "notes.txt").write_text(other)
    with pytest.raises(SecretInUploadError, match="notes.txt holds a Hugging Face token"):
        check_upload(out, ["_*", "checkpoint-*"], [TOKEN])
    (out / "_private.txt").write_text(other)  # what the upload ignores is not read
    (out / "notes.txt").unlink()
    check_upload(out, ["_*", "checkpoint-*"], [TOKEN])

    # Trainer's own push (push_to_hub, and each save's push) goes through the same scan
    args = sp_config(tmp_path / "t", max_steps=1, push_to_hub=True, hub_model_id="me/run", hub_token=TOKEN)
    trainer = SPTrainer(model=timm_classifier(), args=args, train_dataset=tensor_dataset(4))
    trainer.train()
    trainer.save_model()
    (Path(args.output_dir) / "debug.log").write_text(f"token={TOKEN}")
    uploads = len(hub.uploads)
    with pytest.raises(SecretInUploadError, match="debug.log holds the token in use"):
        trainer.push_to_hub()
    with pytest.raises(SecretInUploadError, match="debug.log holds the token in use"):
        trainer._push_from_checkpoint(str(Path(args.output_dir)))
    assert len(hub.uploads) == uploads
    os.remove(Path(args.output_dir) / "debug.log")
