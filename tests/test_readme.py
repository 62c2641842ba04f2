"""The README's Python quick start runs as written (in a temporary folder, offline)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def quick_start() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    return next(b for b in blocks if "SPTrainer(" in b and "trainer.train()" in b)


def test_quick_start_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_L2SP_CACHE", str(tmp_path / "cache"))
    code = quick_start().replace("num_train_epochs=3", "num_train_epochs=1")  # same code path, shorter
    exec(compile(code, str(README), "exec"), {})
    out = capsys.readouterr().out
    assert "pretrained tensors" in out and "test_accuracy" in out
    assert (tmp_path / "runs" / "quickstart" / "README.md").is_file()


@pytest.mark.parametrize("command", ["./dev demo", "./dev test"])
def test_readme_names_the_two_setup_commands(command):
    assert command in README.read_text()


@pytest.mark.slow
def test_demo_command_runs_offline(tmp_path, monkeypatch, capsys):
    """`./dev demo` end to end (about a minute): both runs finish, print test accuracy and leave loadable folders."""
    from hf_l2sp.cli import main

    monkeypatch.setenv("HF_L2SP_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "--output_dir", str(tmp_path / "demo"), "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "l2_sp" in out and "test accuracy" in out
    for run in ("l2_sp", "l2"):
        assert (tmp_path / "demo" / run / "model.safetensors").is_file()
        assert (tmp_path / "demo" / run / "README.md").is_file()
