"""`hf-l2sp study` machinery on a tiny setting: selection sees validation only, reruns skip, outputs parse."""

import csv
import json
import subprocess

import pytest

from hf_l2sp.commands.study import git_commit
from hf_l2sp.study import FisherPlan, Schedule, Setting, SourcePretraining, Study, StudyPlan, write_report
from hf_l2sp.study.protocol import GRIDS
from hf_l2sp.tuning.selection import choose
from hf_l2sp import SPTrainer

from .helpers import write_parquet_repo

REGS = ("none", "l2_sp")


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory):
    data = write_parquet_repo(tmp_path_factory.mktemp("tiny_data"), splits={"train": 60, "test": 15},
                              image_col="image", label_col="label")
    setting = Setting("tiny", "near", "", data, FisherPlan(data, mode="exact", num_samples=8),
                      pretrain=SourcePretraining("test_resnet", data, epochs=1),
                      validation_fraction=0.25, image_size=16)
    schedule = Schedule(steps_per_size={4: 2, 8: 2}, learning_rates=(0.01, 0.05), batch_size=4, eval_batch_size=32,
                        delta_warmup_steps=1)
    return StudyPlan((setting,), regularizers=REGS, sizes=(4, 8), seeds=(0,), selection_seeds=(100, 101),
                     selection_size=4, schedule=schedule)


@pytest.fixture(scope="module")
def finished(tiny_plan, tmp_path_factory):
    """The study run once, in this process, with every evaluation's split recorded per run phase."""
    results = tmp_path_factory.mktemp("study")
    evaluated = []
    original = SPTrainer.evaluate

    def spy(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        if "hf_l2sp_trial_" in self.args.output_dir:  # a study run (not the source pretraining)
            evaluated.append((self.args.output_dir, metric_key_prefix, len(eval_dataset)))
        return original(self, eval_dataset, ignore_keys, metric_key_prefix)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SPTrainer, "evaluate", spy)
        study = Study(tiny_plan, results, workers=1)
        selection = study.run()
    return results, study, selection, evaluated


def _records(results):
    return [json.loads(p.read_text()) for p in sorted((results / "runs").rglob("*.json"))]


def test_selection_uses_validation_only(finished, tiny_plan):
    results, _, selection, evaluated = finished
    records = _records(results)
    expected = len(tiny_plan.selection_seeds) * (2 + len(GRIDS["l2_sp"])) + len(REGS) * 2
    assert len(records) == expected
    for record in records:
        if record["phase"] != "final":
            assert record["test_accuracy"] is None and record["test_images"] is None, record["key"]
        else:
            assert 0 <= record["test_accuracy"] <= 1 and record["test_images"] == 15
    # Test evaluations happen only in final runs: one per final run, and never before that run's validation.
    prefixes = [prefix for _, prefix, _ in evaluated]
    assert prefixes.count("test") == len(REGS) * 2
    assert prefixes.count("val") == len(records)
    for i, prefix in enumerate(prefixes):
        if prefix == "test":
            assert prefixes[i - 1] == "val"
    # The chosen values are the best mean validation accuracy, recomputed here from the records.
    lr_runs = [r for r in records if r["phase"] == "lr"]
    means = {lr: sum(r["val_accuracy"] for r in lr_runs if r["learning_rate"] == lr) / 2 for lr in (0.01, 0.05)}
    best_lr = max(sorted(means), key=lambda lr: means[lr])
    assert selection["tiny"]["learning_rate"]["value"] == best_lr
    grid = [r for r in records if r["phase"] == "grid"]
    assert {r["learning_rate"] for r in grid} == {best_lr}
    sp_means = {v: sum(r["val_accuracy"] for r in grid if r["grid_value"] == v) / 2 for v in GRIDS["l2_sp"]}
    chosen = selection["tiny"]["regularizers"]["l2_sp"]
    assert chosen["value"] == max(sorted(sp_means), key=lambda v: sp_means[v])
    assert len(chosen["split_choices"]) == 2 and 0 <= chosen["agreement"] <= 1
    finals = [r for r in records if r["phase"] == "final" and r["regularizer"] == "l2_sp"]
    assert {r["sp_alpha"] for r in finals} == {chosen["value"]}
    assert {r["learning_rate"] for r in finals} == {best_lr}


def test_rerun_skips_finished_runs_and_redoes_a_missing_one(finished, tiny_plan):
    results, _, selection, _ = finished
    paths = sorted((results / "runs").rglob("*.json"))
    stamps = {p: p.stat().st_mtime_ns for p in paths}
    again = Study(tiny_plan, results, workers=1)
    assert again.run() == selection
    assert [p.executed for p in again.phases] == [0, 0, 0]
    assert {p: p.stat().st_mtime_ns for p in paths} == stamps
    victim = next(p for p in paths if "/final/" in str(p))
    victim.unlink()
    third = Study(tiny_plan, results, workers=1)
    third.run()
    assert [p.executed for p in third.phases] == [0, 0, 1] and victim.is_file()


def test_results_files_are_complete_and_parse(finished):
    results, study, selection, _ = finished
    paths = write_report(results, selection, {"command": "hf-l2sp study --test"})
    with paths["csv"].open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(_records(results))
    for row in rows:
        float(row["val_accuracy"]), float(row["drift"]), float(row["wall_seconds"]), int(row["seed"])
        assert row["regularizer"] in REGS and row["phase"] in ("lr", "grid", "final")
        if row["phase"] == "final":
            float(row["test_accuracy"])
    records = [json.loads(line) for line in paths["records"].read_text().splitlines()]
    assert sorted(r["key"] for r in records) == sorted(row["key"] for row in rows)
    import timm

    from hf_l2sp.loading.model_parts import feature_weight_names

    weights = feature_weight_names(timm.create_model("test_resnet", num_classes=3))
    for r in records:
        assert len(r["drift_layers"]) == len(r["drift_layer_names"]) == len(r["drift_layer_penalised"]) > 10
        flags = [n.removeprefix("timm_model.") in weights for n in r["drift_layer_names"]]
        assert r["drift_layer_penalised"] == flags and any(flags) and not all(flags)
    table = paths["markdown"].read_text()
    assert "hf-l2sp study --test" in table and "| l2_sp | alpha=" in table and "| none | - |" in table
    for plot in (paths["accuracy_plot"], paths["drift_plot"]):
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000


def test_choose_picks_best_mean_and_reports_its_spread():
    runs = [{"seed": s, "alpha": a, "val_accuracy": v} for s, a, v in [
        (0, 0.1, 0.80), (1, 0.1, 0.70), (0, 1.0, 0.75), (1, 1.0, 0.79), (0, 0.01, 0.60), (1, 0.01, 0.89)]]
    choice = choose(runs, "alpha")
    assert choice.value == 1.0 and choice.mean_val == pytest.approx(0.77)
    assert choice.runner_up == 0.1 and choice.margin == pytest.approx(0.02)
    assert choice.split_choices == (0.1, 0.01) and choice.agreement == 0
    tie = choose([{"seed": 0, "a": 2.0, "val_accuracy": 0.5}, {"seed": 0, "a": 1.0, "val_accuracy": 0.5}], "a")
    assert tie.value == 1.0


def test_plan_refuses_reused_seeds_and_unknown_regularizers(tiny_plan):
    with pytest.raises(ValueError, match="selection_seeds must differ from seeds"):
        StudyPlan(tiny_plan.settings, seeds=(0, 100))
    with pytest.raises(ValueError, match=r"Unknown study regularizer\(s\) \['l3'\]; choices: none, l2"):
        StudyPlan(tiny_plan.settings, regularizers=("l2", "l3"))


def test_cli_names_unknown_settings(capsys):
    from hf_l2sp.cli import main

    assert main(["study", "--settings", "far_cifar", "--output", "unused"]) == 2
    assert "Unknown setting(s) ['far_cifar']; choices: far_digits, far_mnist, near_mnist" in capsys.readouterr().err


def test_invocation_commit_says_when_the_code_differs_from_it(tmp_path):
    """A record names the commit only when the package's code is that commit's; an edit adds "+modified"."""
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("x = 1\n")
    assert git_commit(package) == "unknown"  # not a repository
    git("init", "-q")
    git("-c", "user.email=a@b", "-c", "user.name=a", "add", ".")
    assert git_commit(package) == "unknown"  # no commit yet
    git("-c", "user.email=a@b", "-c", "user.name=a", "commit", "-qm", "one")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True,
                          text=True).stdout.strip()
    assert git_commit(package) == head
    (package / "extra.py").write_text("y = 1\n")  # a new module, not yet committed
    assert git_commit(package) == head + "+modified"
    (package / "extra.py").unlink()
    (package / "__init__.py").write_text("x = 2\n")
    assert git_commit(package) == head + "+modified"
    copy = tmp_path / "copy"  # an untracked copy inside a repository (a venv in a checkout) names no commit
    copy.mkdir()
    (copy / "__init__.py").write_text("x = 1\n")
    assert git_commit(copy) == "unknown"
