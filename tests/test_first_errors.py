"""What a newcomer meets first: one-line errors with exit status 2 that name the fix, a short `--help`, the
construction line in a plain script, and model cards that say what the run really did."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import Trainer

from hf_l2sp import SPMixin, SPTrainer
from hf_l2sp.cli import main

from .helpers import sp_config, tensor_dataset, timm_classifier, write_parquet_repo

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def one_line_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_a_mistyped_flag_is_one_line_naming_the_valid_one(capsys):
    err = one_line_error(["train", "--config", "offline_lite0_digits_l2sp", "--sp_alpah", "0.1"], capsys)
    assert "unknown option(s) --sp_alpah" in err and "--sp_alpha?" in err


def test_a_bad_value_is_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "--sp_alpha", "abc"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "invalid float value: 'abc'" in err


def test_a_text_model_given_to_train_points_to_sptrainer(tmp_path, capsys):
    from .text_models import save_distilbert_base

    model = save_distilbert_base(tmp_path / "distilbert")
    data = write_parquet_repo(tmp_path / "data", splits={"train": 6, "test": 3})
    capsys.readouterr()  # the fixtures' own progress bars
    err = one_line_error(["train", "--model_name_or_path", str(model), "--dataset_name", str(data),
                          "--output_dir", str(tmp_path / "out"), "--use_cpu", "true"], capsys)
    assert "is a 'distilbert' model, not an image classifier" in err and "SPTrainer" in err
    assert not (tmp_path / "out").exists()


def test_the_mixin_after_trainer_is_refused_with_the_right_order():
    with pytest.raises(TypeError, match=r"write class Wrong\(SPMixin, Trainer\)"):
        class Wrong(Trainer, SPMixin):
            pass

    class Right(SPMixin, Trainer):  # and subclasses of a right one stay right
        pass

    class Sub(SPTrainer):
        pass


def test_help_is_short_with_config_first_and_resume_last(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    options = [line.split()[0] for line in text.splitlines() if line.startswith("  --")]
    assert len(text.splitlines()) < 60 and options[0] == "--config"
    resume = text[text.index("--resume_from_checkpoint"):]
    assert "`last`" in resume.split("--push_to_hub")[0]
    assert "--help-all" in text
    with pytest.raises(SystemExit):
        main(["train", "--help-all"])
    full = capsys.readouterr().out
    assert "--adam_beta1" in full and full.index("--config") < full.index("--model_name_or_path")


def test_the_construction_line_shows_in_a_plain_script(tmp_path):
    """No logging set up (a plain script): the anchored / new / free shares and the anchor's source still show."""
    script = tmp_path / "plain.py"
    script.write_text(
        "import torch\nfrom hf_l2sp import SPConfig, SPTrainer\n"
        "model = torch.nn.Sequential(torch.nn.Linear(3, 3))\n"
        f"SPTrainer(model=model, args=SPConfig(output_dir={str(tmp_path / 'out')!r}, report_to='none', "
        "use_cpu=True, sp_head='none'))\n")
    done = subprocess.run([sys.executable, str(script)], env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "75.0% anchored, 0.0% new, 25.0% free" in done.stderr and "anchor: snapshot of Sequential" in done.stderr


def test_register_feature_regularizer_is_exported():
    from hf_l2sp import register_feature_regularizer
    from hf_l2sp.penalties.registry import register_feature_regularizer as defined

    assert register_feature_regularizer is defined


def run_card(tmp_path, **overrides) -> tuple[str, dict]:
    trainer = SPTrainer(model=timm_classifier(), args=sp_config(tmp_path, **overrides),
                        train_dataset=tensor_dataset(8))
    trainer.train()
    trainer.save_model()
    out = tmp_path / "out"
    return (out / "README.md").read_text(), json.loads((out / "sp_config.json").read_text())


def test_an_l2_card_says_the_weights_are_pulled_towards_zero(tmp_path):
    card, provenance = run_card(tmp_path, regularizer="l2")
    assert "pulls the weights towards 0" in card and "copied when training started" not in card
    assert "pulls the weights towards 0" in provenance["anchor"]["source"]


def test_card_counts_agree_with_sp_config(tmp_path):
    """sp_config.json counts the tensors w0 holds; the card counts those the penalty acts on, and says why the two
    differ (sp_include='weights' leaves biases and norm layers free)."""
    card, provenance = run_card(tmp_path)
    anchor = provenance["anchor"]
    assert anchor["anchored_tensors"] < anchor["tensors"]
    row = next(line for line in card.splitlines() if line.startswith("| anchored tensors / parameters"))
    assert f"| {anchor['anchored_tensors']} / " in row and f"w0 holds {anchor['tensors']} tensors" in row


def test_a_coefficient_that_is_not_a_number_is_named():
    from hf_l2sp.utils.errors import ConfigError

    for field in ("sp_alpha", "sp_beta", "sp_bss_eta"):
        with pytest.raises(ConfigError, match=f"^{field} must be a finite number >= 0, got 'abc'"):
            sp_config(Path("unused"), **{field: "abc"})


def test_a_skipped_drift_figure_is_said_in_a_plain_script(tmp_path):
    """Without matplotlib the drift figure is skipped with one line, which a plain script (no logging) shows."""
    script = tmp_path / "plain.py"
    script.write_text(
        "import sys\nsys.modules['matplotlib'] = None  # as if not installed\n"
        "from hf_l2sp.artefacts.drift import save_drift\n"
        f"save_drift({{'layers': [], 'stages': [], 'total': {{}}}}, {str(tmp_path)!r})\n")
    done = subprocess.run([sys.executable, str(script)], env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "matplotlib is not installed; drift.png skipped (drift.json has the numbers)" in done.stderr
    assert (tmp_path / "drift.json").is_file() and not (tmp_path / "drift.png").exists()


def test_an_unknown_command_names_the_nearest(capsys):
    assert main(["trian"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hf-l2sp: unknown command 'trian'. Did you mean 'train'?") and "\n" not in err


def test_a_set_up_the_machine_cannot_run_is_one_line_before_anything_loads(tmp_path, capsys):
    """The shipped paper recipes train in bf16 on a GPU: on a CPU-only machine, one line and exit 2 (it was
    transformers' traceback), from the arguments alone: no data or model is read."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine can run the recipe")
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "resnet50_dogs_l2_sp.yaml"
    assert main(["train", "--config", str(recipe), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("hf-l2sp train: error: Your setup doesn't support bf16/gpu. You need to assign use_cpu if you "
                   "want to train the model on CPU.")
    assert not (tmp_path / "out").exists()


def test_help_and_version_answer_without_importing_torch():
    """`hf-l2sp --help`, `version` and `train --help` import neither torch nor transformers: they answer at once."""
    code = (
        "import sys\nfrom hf_l2sp.cli import main\n"
        "for argv in (['--help'], ['version'], ['train', '--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'timm') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert "main options (`--help-all` lists every option" in done.stdout


def test_the_train_help_kept_in_the_package_is_what_the_parser_prints():
    from hf_l2sp.commands.train import HELP_FILE, render_help

    assert HELP_FILE.read_text() == render_help(), "regenerate: HELP_FILE.write_text(render_help())"
