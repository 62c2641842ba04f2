"""DeepSpeed for real: ZeRO-2 and ZeRO-3 through `accelerate launch`, 2 CPU processes (DS_ACCELERATOR=cpu, gloo).

Each launched run is compared with the same run in one process without DeepSpeed (tests/deepspeed_runs.py): a
global batch of 4 x 2 accumulation steps, clipping that engages, the penalty acting from the first step.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from hf_l2sp import Reference, SPConfig
from hf_l2sp.anchor.parameters import resolve_parameters
from hf_l2sp.training.deepspeed_setup import check_deepspeed_launch, deepspeed_command_defaults
from hf_l2sp.training.zero3 import penalty_route
from hf_l2sp.utils.errors import ConfigError

from .helpers import free_port, image_run_assets

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"}
ZERO3_CASES = "l2_sp-loss,l2_sp-grad,l2_sp-decoupled,l2_sp_fisher-loss,l2-loss,none-loss"


def accelerate_yaml(path: Path, stage: int, precision: str = "no") -> Path:
    path.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\n"
        f"mixed_precision: '{precision}'\nnum_machines: 1\nnum_processes: 2\nmain_process_port: {free_port()}\n"
        "deepspeed_config:\n  offload_optimizer_device: none\n  offload_param_device: none\n"
        f"  zero3_init_flag: false\n  zero3_save_16bit_model: true\n  zero_stage: {stage}\nuse_cpu: false\n")
    return path


def run(cmd: list[str], timeout: float = 420) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def launched(out: Path, stage: int, cases: str) -> Path:
    config = accelerate_yaml(out.parent / f"zero{stage}.yaml", stage)
    run([sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file", str(config),
         "-m", "tests.deepspeed_runs", str(out), cases])
    return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed") / "one"
    run([sys.executable, "-m", "tests.deepspeed_runs", str(out), ZERO3_CASES + ",none-retention,resume"])
    return out


@pytest.fixture(scope="module")
def zero3(one_process):
    return launched(one_process.parent / "zero3", 3, ZERO3_CASES + ",none-retention,resume,refusals")


def outcome(folder: Path, rank: int = 0):
    record = json.loads((folder / f"rank{rank}.json").read_text())
    return load_file(str(folder / "model.safetensors")), record


def assert_same_run(a: Path, b: Path) -> None:
    (wa, ra), (wb, rb) = outcome(a), outcome(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-6, atol=1e-7, msg=key)
    for name in ("sp/penalty", "sp/head_penalty", "sp/distance", "grad_norm", "loss"):
        assert [log[name] for log in rb["logs"]] == pytest.approx([log[name] for log in ra["logs"]], rel=1e-6), name


@pytest.mark.parametrize("case", ZERO3_CASES.split(","))
def test_zero3_equals_one_process(one_process, zero3, case):
    """Weights, penalty, distance and the clipped gradient's norm after 2 steps with accumulation: 2 ZeRO-3
    processes equal one process, in every sp_mode, with Fisher weights, plain L2 and 'none'."""
    assert_same_run(one_process / case, zero3 / case)
    _, record = outcome(zero3 / case)
    if case != "none-loss":
        assert record["logs"][-1]["sp/penalty"] > 1.0  # the penalty acted


def test_zero3_retention_set_equals_one_process(one_process, zero3):
    """A retention set (feature CKA, measured before the first step and at step 2) under 2 ZeRO-3 processes: the
    values one process measures, 0 at the start."""
    logs = [[log for log in outcome(folder / "none-retention")[1]["logs"] if "eval_held_cka" in log]
            for folder in (one_process, zero3)]
    assert [log["step"] for log in logs[1]] == [0, 2] and logs[1][0]["eval_held_forgetting"] == 0.0
    assert logs[1][-1]["eval_held_forgetting"] > 1e-6
    for key in ("eval_held_cka", "eval_held_forgetting"):
        assert [log[key] for log in logs[1]] == pytest.approx([log[key] for log in logs[0]], abs=1e-6), key


def test_zero3_resume_at_another_world_size_is_refused_before_training(zero3, one_process):
    """DeepSpeed loads ZeRO partitions only at the world size that saved them: the resume is refused in one line
    that says how to convert, before any training (it crashed inside DeepSpeed once training began)."""
    from hf_l2sp.training.resume_checks import check_deepspeed_world_size, deepspeed_world_size

    checkpoint = zero3 / "resume-straight" / "checkpoint-2"
    assert deepspeed_world_size(checkpoint) == 2
    check_deepspeed_world_size(checkpoint, 2)
    with pytest.raises(ConfigError, match=r"on 1 process\(es\): DeepSpeed saved its ZeRO partitions from 2") as err:
        check_deepspeed_world_size(checkpoint, 1)
    assert "ds_to_universal" in str(err.value) and "load_universal" in str(err.value) and "\n" not in str(err.value)
    assert deepspeed_world_size(one_process / "resume-straight" / "checkpoint-2") is None  # no DeepSpeed there


def test_zero3_keeps_half_the_anchor_per_rank(zero3):
    for rank in (0, 1):
        _, record = outcome(zero3 / "l2_sp-loss", rank)
        assert 0.45 < record["anchor_bytes"] / record["full_anchor_bytes"] < 0.55


def test_zero3_resume_equals_the_uninterrupted_run(one_process, zero3):
    """A new trainer resumed from a ZeRO-3 checkpoint (DeepSpeed's partitioned states + the whole anchor) ends on
    the weights of the run that went straight through, and both on the one-process run's."""
    checkpoint = zero3 / "resume-straight" / "checkpoint-2"
    assert (checkpoint / "sp_anchor.safetensors").is_file()
    assert_same_run(zero3 / "resume-straight", zero3 / "resume-resumed")
    assert_same_run(one_process / "resume-straight", zero3 / "resume-straight")
    one_anchor = load_file(str(one_process / "resume-straight" / "checkpoint-2" / "sp_anchor.safetensors"))
    zero_anchor = load_file(str(checkpoint / "sp_anchor.safetensors"))
    assert one_anchor.keys() == zero_anchor.keys()
    for key in one_anchor:  # gathered from the partitions: the whole w0
        assert torch.equal(one_anchor[key], zero_anchor[key]), key


def test_zero3_final_folder_loads_in_transformers(zero3):
    from transformers import AutoModelForSequenceClassification

    folder = zero3 / "l2_sp-loss"
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    saved = load_file(str(folder / "model.safetensors"))
    assert torch.equal(model.score.weight, saved["score.weight"])
    drift = json.loads((folder / "drift.json").read_text())
    one = json.loads((folder.parent.parent / "one" / "l2_sp-loss" / "drift.json").read_text())
    assert drift["total"]["distance"] == pytest.approx(one["total"]["distance"], rel=1e-5)
    assert [s["stage"] for s in drift["stages"]] == [s["stage"] for s in one["stages"]]
    assert "anchored tensors" in (folder / "README.md").read_text()


def test_zero3_refuses_what_it_cannot_make_exact(zero3):
    found = json.loads((zero3 / "refusals.json").read_text())
    assert "quadratic penalties (l2, l2_sp, l2_sp_fisher); 'l1_sp' is not one" in found["l1_sp"]
    assert "'group_lasso_sp' is not one" in found["group_lasso_sp"]
    assert "feature penalties (bss) are not supported" in found["bss"]
    assert "sp_retention_kl needs the whole anchor beside the model, and DeepSpeed ZeRO-3 shards it" in found["kl"]


def test_zero2_equals_one_process(one_process):
    out = launched(one_process.parent / "zero2", 2, "l2_sp-loss,l2_sp-grad")
    for case in ("l2_sp-loss", "l2_sp-grad"):
        assert_same_run(one_process / case, out / case)


@pytest.fixture(scope="module")
def image_assets(tmp_path_factory):
    return image_run_assets(tmp_path_factory.mktemp("deepspeed_cli"), train=8)


def cli_run(assets: Path, config: str) -> Path:
    out = assets / config
    done = run([sys.executable, "-m", "hf_l2sp.cli", "train", "--accelerate_config", config, "--num_processes", "2",
                "--main_process_port", str(free_port()), "--model_name_or_path", str(assets / "model"),
                "--dataset_name", str(assets / "data"), "--output_dir", str(out), "--image_size", "32",
                "--max_steps", "3", "--per_device_train_batch_size", "2", "--learning_rate", "0.05",
                "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", "--logging_steps", "1",
                "--sp_alpha", "5", "--dataloader_num_workers", "0", "--augmentation", "none"])
    assert "--num_processes 2" in done.stdout and done.stdout.count("test accuracy") == 1
    return out


def shipped_config_run(assets: Path, config: str) -> list[float]:
    """`hf-l2sp train --accelerate_config CONFIG` as shipped (bf16, 8 processes overridden to 2): the command sets
    bf16 and use_cpu itself, and the folder loads in timm and transformers. Returns the logged penalties."""
    import timm
    from transformers import AutoModelForImageClassification

    out = assets / config
    if not (out / "trainer_state.json").is_file():
        cli_run(assets, config)
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert args.bf16 and args.use_cpu
    AutoModelForImageClassification.from_pretrained(out)
    timm.create_model(f"local-dir:{out}", pretrained=True)
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [entry["sp/penalty"] for entry in history if "sp/penalty" in entry]


def test_shipped_zero3_config_runs_from_the_cli_in_bf16(image_assets):
    logs = shipped_config_run(image_assets, "zero3")
    assert len(logs) == 3 and logs[-1] > 1.0


@pytest.mark.slow  # 18 s more
def test_shipped_zero2_config_logs_what_zero3_does(image_assets):
    """ZeRO-3 (the penalty on the fp32 master partitions) logs what ZeRO-2 (the penalty through the loss) does, to
    bf16 precision, both from the shipped configs."""
    zero2 = shipped_config_run(image_assets, "zero2")
    assert shipped_config_run(image_assets, "zero3") == pytest.approx(zero2, rel=2e-2)


def test_precision_and_cpu_mismatches_are_one_line(monkeypatch, tmp_path):
    """The traps of a script under a DeepSpeed accelerate config are caught when its config is built."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(ConfigError, match=r"runs DeepSpeed in bf16 \(mixed_precision: bf16\) but the training "
                                          r"arguments have bf16=False: pass bf16=True \(--bf16 true\)"):
        SPConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    check_deepspeed_launch(SimpleNamespace(bf16=True, fp16=False, use_cpu=True))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"without a GPU .* needs use_cpu=True \(--use_cpu true\)"):
            check_deepspeed_launch(SimpleNamespace(bf16=True, fp16=False, use_cpu=False))


@pytest.mark.skipif(torch.cuda.is_available(), reason="use_cpu is added on machines without a GPU")
def test_the_cli_takes_precision_and_cpu_from_the_accelerate_config(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert deepspeed_command_defaults(["--max_steps", "3"]) == ["--max_steps", "3", "--bf16", "true", "--use_cpu",
                                                                "true"]
    given = ["--bf16=false", "--use_cpu", "false"]  # what the command line says wins (and is then checked)
    assert deepspeed_command_defaults(given) == given
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    assert deepspeed_command_defaults(["--max_steps", "3"]) == ["--max_steps", "3"]


def test_where_each_sp_mode_acts_under_deepspeed():
    assert [penalty_route(None, m) for m in ("loss", "grad", "decoupled")] == ["loss", "optimizer", "optimizer"]
    assert [penalty_route(2, m) for m in ("loss", "grad")] == ["loss", "loss"]  # DeepSpeed's optimizer: no hooks
    assert [penalty_route(3, m) for m in ("loss", "grad", "decoupled")] == ["partitions"] * 3
    for stage in (1, 2):
        with pytest.raises(ConfigError, match=rf"sp_mode='decoupled' under DeepSpeed ZeRO-{stage}: .* Use ZeRO-3"):
            penalty_route(stage, "decoupled")


def test_a_partitioned_parameter_is_never_read_as_empty():
    """A ZeRO-3 parameter outside a gather holds no values: snapshotting or sorting it says so instead."""
    model = torch.nn.Linear(3, 2)
    model.weight.data = torch.empty(0)
    model.weight.ds_numel = 6
    with pytest.raises(ConfigError, match="weight is partitioned by DeepSpeed ZeRO-3: snapshot the model inside"):
        Reference.snapshot(model, [])
    with pytest.raises(ConfigError, match="weight is partitioned by DeepSpeed ZeRO-3, so hf_l2sp cannot read it"):
        resolve_parameters(model, {}, "all")
