"""hf-l2sp search / compare on tiny settings: validation-only selection, resume, pairing, best.yaml round trip."""

import io
import json

import pytest
import yaml
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

from hf_l2sp import compare, search
from hf_l2sp.cli import main
from hf_l2sp.penalties import FEATURE_REGULARIZERS
from hf_l2sp.penalties.spec import search_space
from hf_l2sp.penalties import REGULARIZERS
from hf_l2sp.tuning import engine

from .helpers import pil_images, save_timm_folder


def test_every_regularizer_knows_its_search_space():
    from hf_l2sp.training.config import SPConfig
    from hf_l2sp.study.protocol import GRIDS

    fields = set(SPConfig.__dataclass_fields__)
    for name in list(REGULARIZERS) + list(FEATURE_REGULARIZERS):
        space = search_space(name)
        assert set(space.fields) <= fields, name
        assert list(space.grid) == sorted(space.grid) and (bool(space.grid) == bool(space.fields)), name
    assert search_space("l2").fields == ("sp_alpha", "sp_beta")  # weight decay: one coefficient everywhere
    assert search_space("l2_sp+bss").fields == ("sp_alpha",) and search_space("bss").fields == ("sp_bss_eta",)
    assert search_space("delta").overrides(0.5) == {"sp_delta_alpha": 0.5}
    assert GRIDS["l1_sp"] == search_space("l1_sp").grid and GRIDS["none"] == (0.0,)  # the study reads the registry


def _dataset(path, corrupt_test: bool):
    png = io.BytesIO()
    pil_images(1)[0].save(png, format="PNG")
    images = pil_images(36, seed=3)
    rows = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        rows.append({"bytes": buffer.getvalue(), "path": None})
    features = Features({"image": Image(), "label": ClassLabel(names=["a", "b", "c"])})
    train = Dataset.from_dict({"image": rows[:24], "label": [i % 3 for i in range(24)]}, features=features)
    test_rows = rows[24:]
    if corrupt_test:  # any decode of the test split fails: selection must never read it
        test_rows = [{"bytes": b"this is not an image", "path": None}] * len(test_rows)
    test = Dataset.from_dict({"image": test_rows, "label": [i % 3 for i in range(12)]}, features=features)
    DatasetDict({"train": train, "test": test}).save_to_disk(str(path))
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tuning")
    save_timm_folder(root / "model", architecture="test_convnext", num_classes=5)  # a new head
    return {"root": root, "clean": _dataset(root / "clean", False), "poisoned": _dataset(root / "poisoned", True)}


def options(tiny, dataset="clean", **overrides):
    values = {"model_name_or_path": str(tiny["root"] / "model"), "dataset_name": tiny[dataset], "image_size": 32,
              "max_steps": 2, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 16,
              "learning_rate": 0.05, "optim": "sgd", "use_cpu": True, "dataloader_num_workers": 0,
              "validation_fraction": 0.25, "regularizer": "l2_sp", "augmentation": "none", "seed": 0}
    values.update(overrides)
    return values


def test_selection_never_reads_the_test_split_and_final_reads_it_once(tiny, tmp_path):
    summary = search(options(tiny, "poisoned"), tmp_path / "s", values=[0.01, 1.0], seeds=2)
    rows = (tmp_path / "s" / "search.csv").read_text().splitlines()
    # the searched coefficient's column is named after its field (issue 22d), with the validation size beside it
    assert len(rows) == 1 + 4 and rows[0].startswith("regularizer,sp_alpha,learning_rate,seed")
    assert "val_images" in rows[0] and "value" not in rows[0].split(",")
    assert summary["value"] in (0.01, 1.0) and summary["method"] == "grid"
    assert {p[0] for p in summary["points"]} == {0.01, 1.0}
    records = [json.loads(p.read_text()) for p in (tmp_path / "s" / "runs").glob("*.json")]
    assert all(r["test_accuracy"] is None and r["test_images"] is None for r in records)
    with pytest.raises(engine.RunsFailed, match=r"Cannot decode the image in row 0 of split 'test'"):
        search(options(tiny, "poisoned"), tmp_path / "s", values=[0.01, 1.0], seeds=2, final=True)


def test_resumed_search_redoes_only_missing_runs(tiny, tmp_path, monkeypatch):
    calls = []
    real = engine.run_trial
    monkeypatch.setattr(engine, "run_trial", lambda trial: calls.append(trial.key) or real(trial))
    first = search(options(tiny), tmp_path / "s", values=[0.1, 1.0])
    assert len(calls) == 2
    victim = sorted((tmp_path / "s" / "runs").glob("*.json"))[0]
    victim.unlink()
    again = search(options(tiny), tmp_path / "s", values=[0.1, 1.0])
    assert len(calls) == 3 and calls[-1] == victim.stem  # only the missing run ran again
    assert again["points"] == first["points"]


def test_best_yaml_runs_as_is_with_hf_l2sp_train(tiny, tmp_path):
    summary = search(options(tiny, output_dir=str(tmp_path / "trained")), tmp_path / "s", values=[0.1, 1.0],
                     learning_rates=[0.01, 0.05])
    best = yaml.safe_load((tmp_path / "s" / "best.yaml").read_text())
    assert best["sp_alpha"] == summary["value"] and best["learning_rate"] == summary["learning_rate"]
    assert len(summary["points"]) == 4  # value x learning rate, searched jointly
    assert main(["train", "--config", str(tmp_path / "s" / "best.yaml")]) == 0
    provenance = json.loads((tmp_path / "trained" / "sp_config.json").read_text())
    assert provenance["regularizer"]["alpha"] == summary["value"]


def test_compare_pairs_subsets_and_head_init_across_regularizers(tiny, tmp_path):
    result = compare(options(tiny), tmp_path / "c", ["l2", "l2_sp"], final_seeds=2)
    finals = [json.loads(p.read_text()) for p in (tmp_path / "c" / "all" / "runs").glob("*.json")
              if json.loads(p.read_text()).get("phase") == "final"]
    assert len(finals) == 4
    by_seed = {}
    for r in finals:
        by_seed.setdefault(r["seed"], []).append(r)
    for runs in by_seed.values():
        assert {r["regularizer"] for r in runs} == {"l2", "l2_sp"}
        assert len({r["train_rows"] for r in runs}) == 1 and len({r["head_init"] for r in runs}) == 1
    assert len({runs[0]["train_rows"] for runs in by_seed.values()}) == 2  # another seed, another subset
    assert len({runs[0]["head_init"] for runs in by_seed.values()}) == 2
    table = result["results"]["all"]
    assert table["l2"]["paired"] is None and table["l2_sp"]["paired"]["n"] == 2
    report = (tmp_path / "c" / "report.md").read_text()
    assert "| `l2_sp` |" in report and "vs l2" in report
    assert (tmp_path / "c" / "compare.csv").read_text().count("\n") == 5


def test_tpe_through_hyperparameter_search_resumes_its_study(tiny, tmp_path):
    pytest.importorskip("optuna")
    first = search(options(tiny), tmp_path / "t", values=[0.01, 1.0], n_trials=2)
    assert first["method"] == "tpe" and len(first["points"]) == 2
    assert all(0.01 <= p[0] <= 1.0 for p in first["points"])
    again = search(options(tiny), tmp_path / "t", values=[0.01, 1.0], n_trials=2)  # nothing left to run
    assert again["points"] == first["points"]
    with pytest.raises(ValueError, match="one seed per trial"):
        search(options(tiny), tmp_path / "t2", values=[0.01, 1.0], n_trials=2, seeds=2)


def test_search_command_line(tiny, tmp_path, capsys):
    flags = [x for k, v in options(tiny, output_dir=str(tmp_path / "cli")).items() for x in (f"--{k}", str(v))]
    assert main(["search", *flags, "--search_alpha", "0.1,1"]) == 0
    out = capsys.readouterr().out
    assert "best l2_sp: sp_alpha " in out and (tmp_path / "cli" / "best.yaml").is_file()
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["seeds"] == 1 and summary["fields"] == ["sp_alpha"]


def test_compare_command_line(tiny, tmp_path, capsys):
    flags = [x for k, v in options(tiny, output_dir=str(tmp_path / "cli")).items() for x in (f"--{k}", str(v))]
    assert main(["compare", *flags, "--regularizers", "none,l2_sp", "--final_seeds", "1"]) == 0
    out = capsys.readouterr().out
    assert "| `l2_sp` |" in out and (tmp_path / "cli" / "report.md").is_file()
    results = json.loads(out.strip().splitlines()[-1])
    assert set(results["all"]) == {"none", "l2_sp"} and results["all"]["none"]["value"] is None
    assert main(["compare", *flags, "--regularizers", "l2,l2_sp", "--search_alpha", "0.1"]) == 2
    assert "--search_alpha is for hf-l2sp search" in capsys.readouterr().err


def test_ties_on_validation_accuracy_go_to_the_lower_validation_loss():
    """Issue 22d: a 14-image validation split saturates at 100 %; the choice must not fall silently to the smallest
    value, and the report must say the split cannot resolve the grid."""
    from hf_l2sp.tuning.selection import choose, resolution_note

    records = [{"alpha": a, "seed": s, "val_accuracy": 1.0, "val_loss": loss, "val_images": 14}
               for a, loss in ((0.01, 0.30), (0.1, 0.12), (1.0, 0.20)) for s in (0, 1)]
    choice = choose(records, "alpha")
    assert choice.value == 0.1 and choice.decided_by == "validation loss" and choice.margin == 0.0
    assert choice.val_images == 14 and 0.05 < choice.interval_half_width < 0.2 and choice.resolved is False
    note = resolution_note(choice.as_dict(), "`l2_sp`")
    assert "14 images" in note and "cannot resolve" in note and "validation loss" in note
    clear = choose([{"alpha": a, "seed": 0, "val_accuracy": acc, "val_loss": 0.1, "val_images": 2000}
                    for a, acc in ((0.01, 0.70), (0.1, 0.90))], "alpha")
    assert clear.value == 0.1 and clear.decided_by == "validation accuracy" and clear.resolved
    assert resolution_note(clear.as_dict(), "x") is None


def test_compare_with_a_retention_set_reports_both_axes_and_picks_within_the_budget(tiny, tmp_path, capsys):
    """Both axes for every regularizer, the front written, and --max_forgetting choosing the best test accuracy
    among the regularizers whose mean forgetting is within it (and refusing a budget none meets)."""
    retention = {"retention_dataset": tiny["clean"], "retention_split": "test"}
    flags = [x for k, v in options(tiny, output_dir=str(tmp_path / "cli"), **retention).items()
             for x in (f"--{k}", str(v))]
    assert main(["compare", *flags, "--regularizers", "none,l2_sp", "--final_seeds", "1",
                 "--max_forgetting", "1.0"]) == 0
    out = capsys.readouterr().out
    fronts = json.loads((tmp_path / "cli" / "compare.json").read_text())["fronts"]["all"]
    points = {p["setting"]: p for p in fronts["points"]}
    assert set(points) == {"none", "l2_sp"} and all(0 <= p["forgetting"] <= 1 for p in points.values())
    finals = [json.loads(p.read_text()) for p in (tmp_path / "cli" / "all" / "runs").glob("*.json")]
    for name, point in points.items():
        runs = [r for r in finals if r.get("phase") == "final" and r["regularizer"] == name]
        assert point["forgetting"] == pytest.approx(sum(r["forgetting"] for r in runs) / len(runs))
        assert point["target"] == pytest.approx(sum(r["test_accuracy"] for r in runs) / len(runs))
    best = max(points.values(), key=lambda p: p["target"])  # every one is within a budget of 1
    assert fronts["best_within_budget"] == best["setting"]
    assert f"Within --max_forgetting 1, the best test accuracy is `{best['setting']}`" in out
    assert "forgetting |" in out and (tmp_path / "cli" / "all" / "front.csv").is_file()
    assert (tmp_path / "cli" / "all" / "front.png").is_file()
    csv_rows = (tmp_path / "cli" / "all" / "front.csv").read_text().splitlines()
    assert csv_rows[0] == "setting,value,learning_rate,target,forgetting,n,on_front,within_budget"
    searched = (tmp_path / "cli" / "all" / "l2_sp" / "front.csv").read_text().splitlines()
    assert sum(line.startswith("none,") for line in searched) == 1  # plain fine-tuning beside every alpha
    assert sum(line.startswith("l2_sp,") for line in searched) == len(search_space("l2_sp").grid)
    # a budget no regularizer meets: one line naming the least forgetting (the runs are cached: no training)
    assert main(["compare", *flags, "--regularizers", "none,l2_sp", "--final_seeds", "1",
                 "--max_forgetting", "-1"]) == 2
    assert "keeps forgetting within --max_forgetting -1: the least forgetting was" in capsys.readouterr().err


def test_search_front_includes_the_plain_baseline_and_the_budget_restricts_the_choice():
    from hf_l2sp.tuning.front import settings, within_budget
    from hf_l2sp.tuning.search import choose_point

    def row(value, seed, acc, forgetting):
        return {"regularizer": "l2_sp", "value": value, "learning_rate": 0.01, "seed": seed, "val_accuracy": acc,
                "forgetting": forgetting}

    rows = [row(0.01, 0, 0.9, 0.30), row(0.01, 1, 0.8, 0.20), row(0.1, 0, 0.8, 0.10), row(0.1, 1, 0.8, 0.10),
            row(0.3, 0, 0.7, 0.2), row(0.3, 1, 0.7, 0.2), row(1.0, 0, 0.5, 0.01), row(1.0, 1, 0.5, 0.01)]
    assert choose_point(rows)["value"] == 0.01  # accuracy alone: 0.85
    chosen = choose_point(rows, max_forgetting=0.2)  # 0.01 forgets 0.25 on average: out
    assert chosen["value"] == 0.1 and chosen["mean_forgetting"] == pytest.approx(0.1)
    assert choose_point(rows, max_forgetting=0.05)["value"] == 1.0
    with pytest.raises(ValueError, match="least forgetting was 0.01 \\(l2_sp 1 lr 0.01\\)"):
        choose_point(rows, max_forgetting=0.001)
    points = settings(rows + [{**row(None, 0, 0.86, 0.5), "regularizer": "none"}], "val_accuracy")
    front = {(p["setting"], p["value"]) for p in points if p["on_front"]}
    # 0.3 (0.70, 0.20) is dominated by 0.1 (0.80, 0.10); none (0.86, 0.50) gains most and forgets most
    assert front == {("none", None), ("l2_sp", 0.01), ("l2_sp", 0.1), ("l2_sp", 1.0)}
    assert [p["within_budget"] for p in within_budget(points, 0.2, "setting")] == [True, True, True]
