"""`hf-l2sp train` end to end on local stand-ins, recipes, bad input, and a real 2-process launch."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hf_l2sp.cli import main
from hf_l2sp.commands import train

from .helpers import free_port, pil_images, save_timm_folder, write_parquet_repo

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def tiny_flags(tmp_path, **overrides):
    if not (tmp_path / "model").exists():
        save_timm_folder(tmp_path / "model", num_classes=7)
        write_parquet_repo(tmp_path / "data", splits={"train": 24, "test": 12})
    flags = {"model_name_or_path": str(tmp_path / "model"), "dataset_name": str(tmp_path / "data"),
             "output_dir": str(tmp_path / "out"), "image_size": "32", "max_steps": "3",
             "per_device_train_batch_size": "4", "per_device_eval_batch_size": "8", "learning_rate": "0.01",
             "optim": "sgd", "use_cpu": "true", "report_to": "none", "save_strategy": "no",
             "disable_tqdm": "true", "logging_steps": "1", "regularizer": "l2_sp", "dataloader_num_workers": "0"}
    flags.update({k: str(v) for k, v in overrides.items()})
    return [x for k, v in flags.items() for x in (f"--{k}", v)]


def test_help_is_clean(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--config", "--model_name_or_path", "--dataset_name", "--regularizer", "--sp_alpha",
                   "--max_train_samples_per_class", "--output_dir"):
        assert option in out
    assert main(["--help"]) == 0 and "train" in capsys.readouterr().out


def test_train_end_to_end_writes_metrics_and_model(tmp_path, capsys):
    assert main(["train", *tiny_flags(tmp_path)]) == 0
    results = json.loads((tmp_path / "out" / "all_results.json").read_text())
    for key in ("train_loss", "eval_accuracy", "test_accuracy", "eval_loss"):
        assert key in results
    assert "top5_accuracy" not in " ".join(results)  # 3 classes: no top-5
    assert "test accuracy:" in capsys.readouterr().out
    assert (tmp_path / "out" / "model.safetensors").is_file()
    logs = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    assert any("sp/penalty" in log for log in logs)


def test_recipe_with_flag_overrides(tmp_path):
    flags = tiny_flags(tmp_path)
    recipe = dict(zip([f[2:] for f in flags[::2]], flags[1::2]))
    recipe.update({"sp_alpha": 0.5, "max_steps": 1})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    model_args, data_args, args = train.parse_args(["--config", str(tmp_path / "r.yaml"), "--sp_alpha", "0.25"])
    assert args.sp_alpha == 0.25 and args.max_steps == 1 and data_args.image_size == 32
    assert model_args.model_name_or_path == str(tmp_path / "model")


def test_unknown_recipe_keys_are_named(tmp_path, capsys):
    (tmp_path / "r.yaml").write_text("sp_alpah: 0.1\nlearning_rate: 0.1\nmodel_nme: x\n")
    assert main(["train", "--config", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err
    assert "keys no option knows: model_nme, sp_alpah" in err and "Traceback" not in err


@pytest.mark.parametrize("overrides, match", [
    ({"dataset_name": "nobody/nothing"}, "Could not load dataset 'nobody/nothing': offline mode is on"),
    ({"model_name_or_path": "nobody/nothing"}, "Could not load model 'nobody/nothing'"),
    ({"regularizer": "l3"}, "Unknown regularizer 'l3'. Valid choices"),
])
def test_bad_input_is_one_clear_line_and_writes_nothing(tmp_path, capsys, overrides, match):
    assert main(["train", *tiny_flags(tmp_path, **overrides)]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def _corrupt_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x00\x01 not safetensors at all")
    return str(path)


def _one_class_folder(tmp_path):
    for split in ("train", "test"):
        (tmp_path / "folder" / split / "cat").mkdir(parents=True)
        for i, image in enumerate(pil_images(3)):
            image.save(tmp_path / "folder" / split / "cat" / f"{i}.png")
    return str(tmp_path / "folder")


@pytest.mark.parametrize("make_overrides, match", [
    (lambda t: {"regularizer": "l2_sp_fisher", "sp_fisher": _corrupt_file(t, "fisher.safetensors")},
     r"Fisher file '.*fisher.safetensors' is not a readable safetensors file \(.*\); write it with"),
    (lambda t: {"sp_reference": _corrupt_file(t, "w0.safetensors")},
     r"Weights file '.*w0.safetensors' is not a readable safetensors file"),
    (lambda t: {"dataset_name": str(t / "no" / "such" / "folder")},
     r"dataset_name '.*/no/such/folder': no such folder\. Give an existing local folder"),
    (lambda t: {"dataset_name": _one_class_folder(t)},
     r"has one class folder \('cat'\): an image folder needs one sub-folder per class, at least two"),
    (lambda t: {"label_column": "note"},
     r"label_column 'note' looks like free text, not class labels: 24 distinct values in 36 rows"),
], ids=["corrupt_fisher", "corrupt_reference", "missing_local_dataset", "single_class_folder", "free_text_label"])
def test_more_bad_input_is_one_clear_line_and_writes_nothing(tmp_path, capsys, make_overrides, match):
    assert main(["train", *tiny_flags(tmp_path, **make_overrides(tmp_path))]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hf-l2sp train: error:")]
    assert len(errors) == 1 and re.search(match, errors[0]), errors
    assert not (tmp_path / "out").exists()


def test_non_empty_output_dir_is_refused(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(["train", *tiny_flags(tmp_path)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert os.listdir(tmp_path / "out") == ["keep.txt"]
    assert main(["train", *tiny_flags(tmp_path, overwrite_output_dir="true")]) == 0


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Local stand-ins for the recipes' Hub ids: a tiny timm ResNet folder, and datasets with each Hub layout."""
    root = tmp_path_factory.mktemp("stand_ins")
    save_timm_folder(root / "model", architecture="test_resnet", num_classes=7)
    write_parquet_repo(root / "train_test", splits={"train": 16, "test": 4}, num_labels=4)
    write_parquet_repo(root / "train_validation", splits={"train": 16, "validation": 4}, num_labels=4)
    return root


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_recipe_runs_as_written(recipe, stand_ins, tmp_path):
    """Each recipe as written (bf16, 8 loader workers, tensorboard, its schedule and augmentation), for 2 steps,
    with only its Hub ids swapped for local stand-ins and `use_cpu` (this machine has no GPU): what
    `pip install ".[paper]"` users run."""
    settings = yaml.safe_load(recipe.read_text())
    layout = "train_validation" if settings.get("test_split") == "validation" else "train_test"
    flags = ["--config", str(recipe), "--model_name_or_path", str(stand_ins / "model"),
             "--dataset_name", str(stand_ins / layout), "--output_dir", str(tmp_path / "run"), "--max_steps", "2",
             "--use_cpu", "true"]
    assert main(["train", *flags]) == 0
    run = tmp_path / "run"
    assert (run / "model.safetensors").is_file() and (run / "README.md").is_file()
    if settings.get("report_to") == "tensorboard":
        assert list(run.glob("runs/*/events.out.tfevents.*")), "tensorboard wrote no event file"
    results = json.loads((run / "all_results.json").read_text())
    assert "test_accuracy" in results and "eval_accuracy" in results


@pytest.mark.skipif(shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists(),
                    reason="accelerate CLI not installed")
def test_accelerate_launch_two_processes(tmp_path):
    """`--multi_gpu --num_processes 2` really runs two gloo ranks on CPU (`--cpu` would silently run one)."""
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    flags = tiny_flags(tmp_path, max_steps=2, per_device_train_batch_size=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "hf_l2sp.cli", "train", *flags]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    # 21 training images (24 minus a 10 % validation carve): one rank of two sees 11, i.e. 6 batches of 2 per epoch,
    # so 2 steps are 1/3 of an epoch; a single process would need 11 batches (epoch 0.18).
    assert state["log_history"][-1]["epoch"] == pytest.approx(2 / 6, abs=1e-3)
    assert "test_accuracy" in json.loads((tmp_path / "out" / "all_results.json").read_text())


def _user_errors():
    from hf_l2sp.utils.errors import ConfigError, DivergedError, MissingFileError, OutputExistsError

    return [ConfigError("bad option"), MissingFileError("no such file"), OutputExistsError("not empty"),
            DivergedError("nan")]


@pytest.mark.parametrize("error, user", [
    (TypeError("a bug"), False), (OSError("a bug"), False), (KeyError("a bug"), False),
    # a plain ValueError / FileNotFoundError comes from a bug (the package raises its own classes): traceback kept
    (ValueError("a bug"), False), (FileNotFoundError("a bug"), False),
    *((error, True) for error in _user_errors()),
])
def test_user_errors_are_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys, error, user):
    import hf_l2sp.commands.info as info
    from hf_l2sp.utils.hub import HubUnavailableError

    def boom(_argv):
        raise error

    monkeypatch.delenv("HF_L2SP_DEBUG", raising=False)
    monkeypatch.setattr(info, "version", boom)
    if user:
        assert main(["version"]) == 2
        assert capsys.readouterr().err.strip() == f"hf-l2sp version: error: {error}"
    else:
        with pytest.raises(type(error)):
            main(["version"])
    monkeypatch.setattr(info, "version", lambda _argv: (_ for _ in ()).throw(HubUnavailableError("offline")))
    assert main(["version"]) == 2
