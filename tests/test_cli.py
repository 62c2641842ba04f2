"""`hf-l2sp train` end to end on local stand-ins, recipes, bad input, and a real 2-process launch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hf_l2sp import SPTrainer
from hf_l2sp.cli import main
from hf_l2sp.commands import train

from .helpers import save_timm_folder, tensor_dataset, write_parquet_repo

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


def test_non_empty_output_dir_is_refused(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(["train", *tiny_flags(tmp_path)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert os.listdir(tmp_path / "out") == ["keep.txt"]
    assert main(["train", *tiny_flags(tmp_path, overwrite_output_dir="true")]) == 0


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_recipe_parses_and_builds_its_trainer(recipe, tmp_path):
    """Dry run: parse the recipe, build its architecture (random init) and the SPTrainer, and its LR schedule."""
    model_args, data_args, args = train.parse_args(["--config", str(recipe), "--output_dir", str(tmp_path),
                                                    "--use_cpu", "true", "--bf16", "false", "--report_to", "none"])
    assert model_args.model_name_or_path and data_args.dataset_name
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    name = model_args.model_name_or_path.split("/")[-1].split(".")[0].removeprefix("hf_l2sp:")
    architecture = "tf_efficientnet_lite0" if name == "efficientnet_lite0" else name
    model = TimmWrapperForImageClassification(TimmWrapperConfig(architecture=architecture, num_labels=3))
    data = tensor_dataset(4, size=32)
    trainer = SPTrainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    assert trainer.regularizer.name == args.regularizer
    steps = args.max_steps if args.max_steps > 0 else 100
    trainer.create_optimizer_and_scheduler(num_training_steps=steps)
    if args.lr_scheduler_type == "warmup_stable_decay":  # the paper's x0.1 step after 6000 iterations
        lrs = [trainer.lr_scheduler.lr_lambdas[0](s) for s in (0, 5999, 6000, 6001, 8999)]
        assert lrs == [1.0, 1.0, 1.0, 0.1, 0.1]
    assert trainer.optimizer.defaults.get("momentum", 0.0) == pytest.approx(0.9)


@pytest.mark.skipif(shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists(),
                    reason="accelerate CLI not installed")
def test_accelerate_launch_two_processes(tmp_path):
    """`--multi_gpu --num_processes 2` really runs two gloo ranks on CPU (`--cpu` would silently run one)."""
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    flags = tiny_flags(tmp_path, max_steps=2, per_device_train_batch_size=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
           "-m", "hf_l2sp.cli", "train", *flags]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    # 21 training images (24 minus a 10 % validation carve): one rank of two sees 11, i.e. 6 batches of 2 per epoch,
    # so 2 steps are 1/3 of an epoch; a single process would need 11 batches (epoch 0.18).
    assert state["log_history"][-1]["epoch"] == pytest.approx(2 / 6, abs=1e-3)
    assert "test_accuracy" in json.loads((tmp_path / "out" / "all_results.json").read_text())
