"""`search`: which coefficient (and learning rate) suits a regularizer on this data, chosen on validation only.

Grid: every value x learning rate x seed is one run of the engine (resumable, parallel); the value with the best
mean validation accuracy over the seeds wins (ties: the lower validation loss, then the smaller value). TPE:
`n_trials` optuna trials over log(value) (and log(lr)), run by `SPTrainer.hyperparameter_search` with the trials
stored in `optuna.db` (rerunning continues the same study). The test split is never loaded while choosing;
`final=True` then trains the chosen configuration once and evaluates it on test.
"""

from __future__ import annotations

import csv
import json
import logging
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from ..penalties.spec import SearchSpace, search_space
from ..pipeline.options import parse_options
from .engine import RUN_CONTROL, Trial, run_trials
from .front import settings, within_budget, write_front
from .selection import choose, resolution_note
from ..utils.errors import ConfigError
from ..utils.logs import announce

logger = logging.getLogger("hf_l2sp.tuning")
SEARCH_OFFSET = 100  # search seeds are base seed + 100 + k: never the final runs' seeds (base seed + k)
CSV_FIELDS = ("regularizer", "value", "learning_rate", "seed", "data_seed", "val_accuracy",
              "val_mean_per_class_accuracy", "val_loss", "val_images", "drift", "forgetting", "train_seconds")


def base_settings(options: dict[str, Any]) -> tuple[str, float, int]:
    """(regularizer, learning rate, seed) the options give, with `hf-l2sp train`'s defaults."""
    _, _, args = parse_options({**options, "output_dir": options.get("output_dir", "unused")})
    return args.regularizer, args.learning_rate, args.seed


def search(options: dict[str, Any], output_dir: str | Path, *, values: list[float] | None = None,
           n_trials: int | None = None, seeds: int = 1, learning_rates: list[float] | None = None,
           vary_split: bool = False, final: bool = False, workers: int = 1,
           max_forgetting: float | None = None) -> dict:
    """Search the regularizer's coefficient for `options` (a recipe-like mapping, as `hf-l2sp train` takes).

    values: the grid (default: the regularizer's own, from the registry); n_trials: TPE instead of a grid;
    seeds: runs per point (head init and batch order; the validation carve too when `vary_split`);
    learning_rates: searched jointly with the value when given. Writes `search.csv` (one row per run),
    `search.png`, `selection.json` and `best.yaml` (a recipe `hf-l2sp train --config` runs as is), and with
    `final` `final.json` (test metrics of the chosen configuration). Returns the summary.

    With a retention set (`retention_dataset` in the options) every run also records its forgetting; plain
    fine-tuning (`none`) runs beside the grid as the baseline, and `front.csv` / `front.png` put every point on both
    axes with its Pareto front. `max_forgetting`: the chosen point is the best validation accuracy among the points
    whose mean forgetting is at most this.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    regularizer, base_lr, base_seed = base_settings(options)
    space = search_space(regularizer)
    grid = [None] if not space.fields else sorted(values or space.grid)
    if space.fields and any(v < 0 for v in grid):
        raise ConfigError(f"Search values must be >= 0; got {grid}.")
    lrs = sorted(learning_rates) if learning_rates else [base_lr]
    if seeds < 1:
        raise ConfigError(f"seeds must be >= 1; got {seeds}.")
    retention = bool(options.get("retention_dataset"))
    if max_forgetting is not None and not retention:
        raise ConfigError("--max_forgetting needs a retention set to measure forgetting on: give "
                          "--retention_dataset (an image folder or Hub dataset the source model knew).")
    if n_trials is not None and space.fields:
        if retention:
            raise ConfigError("n_trials (TPE) maximises validation accuracy alone; with a retention_dataset search "
                              "a grid (--search_alpha), which measures both axes at every point.")
        rows = _tpe(options, output_dir, space, grid, lrs, n_trials, seeds, base_seed, regularizer)
    else:
        rows = _grid(options, output_dir, space, grid, lrs, seeds, base_seed, vary_split, workers, regularizer)
    choice = choose_point(rows, max_forgetting)
    best_value, best_lr = choice["value"], choice["learning_rate"]
    best = {**options, **space.overrides(best_value), "learning_rate": best_lr}
    _write_csv(rows, output_dir / "search.csv", space.fields)
    _write_best(best, regularizer, {**choice, "max_forgetting": max_forgetting}, output_dir / "best.yaml",
                space.fields)
    summary = {"regularizer": regularizer, "fields": list(space.fields), "grid": grid, "learning_rates": lrs,
               "seeds": seeds, "method": "tpe" if n_trials is not None and space.fields else "grid", **choice,
               "max_forgetting": max_forgetting, "best_options": best}
    plot_search(rows, output_dir / "search.png", regularizer, space.fields)
    if retention:
        summary["front"] = _front(options, output_dir, rows, lrs, seeds, base_seed, workers, regularizer,
                                  max_forgetting)
    if note := resolution_note(choice, regularizer):
        logger.warning("hf_l2sp search: %s", note)
    if final:
        summary["final"] = run_final(best, output_dir, base_seed, workers)
    (output_dir / "selection.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def run_final(options: dict[str, Any], output_dir: Path, seed: int, workers: int = 1) -> dict:
    """The chosen configuration, trained once (the base seed and split) and evaluated on test once."""
    trial = Trial.make(options, seed=seed, evaluate_test=True, fields={"phase": "final"})
    (record,), _ = run_trials([trial], output_dir, workers, name="final")
    (output_dir / "final.json").write_text(json.dumps(record, indent=1))
    return {k: record[k] for k in ("val_accuracy", "test_accuracy", "test_mean_per_class_accuracy", "drift")}


def _front(options, output_dir: Path, rows, lrs, seeds, base_seed, workers, regularizer, max_forgetting) -> list:
    """Both axes for every point and for plain fine-tuning (`none`, same learning rates and seeds), the front."""
    trials = [Trial.make({**options, "regularizer": "none", "learning_rate": lr}, seed=base_seed + SEARCH_OFFSET + k,
                         data_seed=base_seed + SEARCH_OFFSET, fields={"phase": "baseline", "value": None})
              for lr in lrs for k in range(seeds)] if regularizer != "none" else []
    baseline, _ = run_trials(trials, output_dir, workers, name="baseline none")
    points = settings(rows + [{f: r.get(f) for f in CSV_FIELDS} for r in baseline], "val_accuracy")
    within_budget(points, max_forgetting, "setting")
    write_front(points, output_dir, "validation accuracy", f"{regularizer}: validation accuracy against forgetting")
    return points


def _grid(options, output_dir, space: SearchSpace, grid, lrs, seeds, base_seed, vary_split, workers, regularizer):
    trials = []
    for value in grid:
        for lr in lrs:
            for k in range(seeds):
                seed = base_seed + SEARCH_OFFSET + k
                trials.append(Trial.make({**options, **space.overrides(value), "learning_rate": lr}, seed=seed,
                                         data_seed=seed if vary_split else base_seed + SEARCH_OFFSET,
                                         fields={"phase": "search", "value": value}))
    records, _ = run_trials(trials, output_dir, workers, name=f"search {regularizer}")
    return [{field: record.get(field) for field in CSV_FIELDS} for record in records]


def _tpe(options, output_dir, space: SearchSpace, grid, lrs, n_trials, seeds, base_seed, regularizer):
    """optuna TPE through `SPTrainer.hyperparameter_search` (one seed per trial), over [min, max] of the grid."""
    try:
        import optuna
    except ImportError as err:
        raise ImportError("n_trials (TPE) needs optuna: install the search extra "
                          "(pip install '.[search]' in a checkout).") from err
    from transformers import set_seed

    from ..artefacts.trainer import SPTrainer
    from ..loading.data import NO_SPLIT, load_image_dataset
    from ..loading.metrics import compute_metrics
    from ..loading.models import data_config_of, load_backbone
    from ..loading.transforms import build_transforms, collate_images, with_transforms

    if seeds != 1:
        raise ConfigError("n_trials (TPE) runs one seed per trial (Trainer.hyperparameter_search); use a grid "
                          "(search_alpha) for several seeds per value.")
    low, high = min(grid), max(grid)
    if low <= 0 or low == high:
        raise ConfigError(f"TPE searches log(value) between the grid's ends; got [{low}, {high}]. Give at least two "
                          "positive values.")
    seed = base_seed + SEARCH_OFFSET
    model_args, data_args, args = parse_options({**options, **RUN_CONTROL, "output_dir": str(output_dir / "tpe"),
                                                 "test_split": NO_SPLIT, "seed": seed, "data_seed": seed})
    data = load_image_dataset(data_args, seed=seed)

    def model_init(trial=None):
        set_seed(seed)  # every trial starts from the same head
        return load_backbone(model_args.model_name_or_path, data.id2label, model_args.model_revision,
                             model_args.cache_dir)[0]

    transforms = build_transforms(data_config_of(model_init()), data_args.augmentation, data_args.image_size)
    splits = with_transforms(data, transforms.train, transforms.eval)
    trainer = SPTrainer(model_init=model_init, args=args, train_dataset=splits["train"],
                        eval_dataset=splits["validation"], data_collator=collate_images,
                        compute_metrics=compute_metrics)

    def hp_space(trial):
        value = trial.suggest_float("value", low, high, log=True)
        point = space.overrides(value)
        if len(lrs) > 1:
            point["learning_rate"] = trial.suggest_float("learning_rate", lrs[0], lrs[-1], log=True)
        return point

    storage, name = f"sqlite:///{output_dir / 'optuna.db'}", "hf_l2sp_search"
    done = _completed(optuna, storage, name)
    if n_trials > done:
        trainer.hyperparameter_search(direction="maximize", backend="optuna", hp_space=hp_space,
                                      n_trials=n_trials - done, compute_objective=lambda m: m["eval_accuracy"],
                                      storage=storage, study_name=name, load_if_exists=True,
                                      sampler=optuna.samplers.TPESampler(seed=seed))
    study = optuna.load_study(study_name=name, storage=storage)
    return [{"regularizer": regularizer, "value": t.params["value"],
             "learning_rate": t.params.get("learning_rate", lrs[0]), "seed": seed, "data_seed": seed,
             "val_accuracy": t.value} for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]


def _completed(optuna, storage: str, name: str) -> int:
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:  # no such study yet
        return 0
    return sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


def choose_point(rows: list[dict], max_forgetting: float | None = None) -> dict:
    """The (value, learning rate) with the best mean validation accuracy over the seeds (`selection.choose`: ties to
    the lower validation loss, then the smaller value and learning rate), with the runner-up margin, the seed spread,
    the choice each seed alone would have made, and whether the validation split resolves the margin. Reads
    validation results only. `max_forgetting`: among the points whose mean forgetting is at most this."""
    if not rows:
        raise ConfigError("No finished search runs to choose from.")
    if max_forgetting is not None:
        kept = within_budget(settings(rows, "val_accuracy"), max_forgetting, "searched setting")
        allowed = {(p["value"], p["learning_rate"]) for p in kept}
        rows = [r for r in rows if (r["value"], r["learning_rate"]) in allowed]
    chosen = choose([{**r, "point": (r["value"], r["learning_rate"])} for r in rows], "point")
    choice = {**chosen.as_dict(), "resolved": chosen.resolved}
    (value, lr) = choice.pop("value")
    chosen_rows = [r["forgetting"] for r in rows if (r["value"], r["learning_rate"]) == (value, lr)
                   and r.get("forgetting") is not None]
    return {"value": value, "learning_rate": lr, "mean_val_accuracy": choice["mean_val"],
            "mean_forgetting": statistics.fmean(chosen_rows) if chosen_rows else None,
            "std_val_accuracy": choice["std_val"], "runner_up": choice["runner_up"], "margin": choice["margin"],
            "agreement": choice["agreement"], "seed_choices": choice["split_choices"],
            "decided_by": choice["decided_by"], "val_images": choice["val_images"],
            "interval_half_width": choice["interval_half_width"], "resolved": choice["resolved"],
            "points": [[v, r, mean] for (v, r), mean in choice["grid"]]}


def _write_csv(rows: list[dict], path: Path, fields: tuple[str, ...]) -> None:
    """One row per run; the searched coefficient's column is named after its field(s) (`sp_alpha`, ...)."""
    named = [f for f in CSV_FIELDS if f != "value"]
    names = list(fields)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[named[0], *names, *named[1:]], extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**row, **{name: row["value"] for name in names}} for row in rows)


def _write_best(best: dict, regularizer: str, choice: dict, path: Path, fields: tuple[str, ...] = ()) -> None:
    named = "".join(f"{name}={choice['value']} " for name in fields)
    budget = ("" if choice.get("max_forgetting") is None
              else f" among the points with mean forgetting <= {choice['max_forgetting']:g}")
    header = (f"# Chosen by hf-l2sp search on validation accuracy{budget}: {regularizer} {named}"
              f"learning_rate={choice['learning_rate']} (mean val accuracy {choice['mean_val_accuracy']:.4f}).\n"
              "# Run it with: hf-l2sp train --config best.yaml\n")
    path.write_text(header + yaml.safe_dump(best, sort_keys=False))


def plot_search(rows: list[dict], path: Path, regularizer: str, fields: tuple[str, ...] = ()) -> Path | None:
    """Validation accuracy against the value, mean and seed spread, one line per learning rate (if matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        announce(logger, f"hf_l2sp: matplotlib is not installed; {path.name} skipped.")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
    for lr in sorted({r["learning_rate"] for r in rows}):
        by_value: dict[float, list[float]] = defaultdict(list)
        for r in rows:
            if r["learning_rate"] == lr and r["value"] is not None:
                by_value[r["value"]].append(100 * r["val_accuracy"])
        xs = sorted(by_value)
        if not xs:
            continue
        means = [statistics.fmean(by_value[x]) for x in xs]
        spread = [statistics.stdev(by_value[x]) if len(by_value[x]) > 1 else 0.0 for x in xs]
        ax.errorbar(xs, means, yerr=spread, marker="o", ms=3, capsize=2, label=f"lr {lr:g}")
        ax.scatter([x for x in xs for _ in by_value[x]], [v for x in xs for v in by_value[x]], s=6, alpha=0.4)
    if rows and all(r["value"] is not None and r["value"] > 0 for r in rows):
        ax.set_xscale("log")
    ax.set_xlabel(" = ".join(fields) or "searched coefficient")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"{regularizer}: validation accuracy (mean, seed spread)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
