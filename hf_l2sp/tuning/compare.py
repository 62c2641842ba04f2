"""`compare`: does a regularizer help on this data? Each one tuned on its own grid (validation only), then trained on
paired seeds and evaluated on test once per seed.

Paired means that for a given seed every regularizer gets the same few-shot training subset, the same validation
carve and the same initial head (the engine records fingerprints of both, `train_rows` and `head_init`), so the
per-seed test-accuracy differences isolate the regularizer. The report: mean +- std of test accuracy, the paired
difference to the first regularizer (mean, wins/losses, paired t-test when scipy is installed), the selection
margins, accuracy and drift plots, `compare.csv` and `report.md`.
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Any

from .engine import Trial, run_trials
from .front import describe, has_forgetting, settings, within_budget, write_front
from .search import base_settings, search
from .selection import resolution_note
from ..utils.errors import ConfigError

FINAL_FIELDS = ("size", "regularizer", "seed", "value", "learning_rate", "val_accuracy", "test_accuracy",
                "test_mean_per_class_accuracy", "drift", "forgetting", "train_rows", "head_init", "train_seconds")


def compare(options: dict[str, Any], output_dir: str | Path, regularizers: list[str], *,
            samples_per_class: list[int] | None = None, final_seeds: int = 5, search_seeds: int = 1,
            learning_rates: list[float] | None = None, search_lr: bool = False, vary_split: bool = False,
            n_trials: int | None = None, workers: int = 1, max_forgetting: float | None = None) -> dict:
    """Search each regularizer, then run the paired final runs; `samples_per_class` repeats it per size.

    learning_rates with `search_lr`: searched jointly per regularizer; without: the options' learning rate is
    shared. Returns {size: {regularizer: summary}} and writes everything under `output_dir`.

    With a retention set (`retention_dataset`) each final run also records its forgetting: the report gives both
    axes, `front.csv` / `front.png` the regularizers' front per size, and `max_forgetting` makes every search choose
    within that budget and names the regularizer with the best test accuracy among those whose mean forgetting
    stays within it (`best_within_budget`).
    """
    if max_forgetting is not None and not options.get("retention_dataset"):
        raise ConfigError("--max_forgetting needs a retention set to measure forgetting on: give "
                          "--retention_dataset (an image folder or Hub dataset the source model knew).")
    if len(regularizers) < 2 or len(set(regularizers)) != len(regularizers):
        raise ConfigError(f"compare needs at least two different regularizers; got {regularizers}.")
    if final_seeds < 1:
        raise ConfigError(f"final_seeds must be >= 1; got {final_seeds}.")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _, _, base_seed = base_settings(options)
    sizes = samples_per_class or [options.get("max_train_samples_per_class")]
    results, finals, selections, fronts = {}, [], {}, {}
    for size in sizes:
        sized = {**options, "max_train_samples_per_class": size} if size else dict(options)
        label = str(size) if size else "all"
        chosen = {}
        for regularizer in regularizers:
            chosen[regularizer] = search({**sized, "regularizer": regularizer}, output_dir / label / regularizer,
                                         seeds=search_seeds, learning_rates=learning_rates if search_lr else None,
                                         vary_split=vary_split, n_trials=n_trials, workers=workers,
                                         max_forgetting=max_forgetting)
        selections[label] = chosen
        trials = [Trial.make(chosen[reg]["best_options"], seed=base_seed + k, evaluate_test=True,
                             fields={"phase": "final", "setting": "compare", "size": size or 0,
                                     "value": chosen[reg]["value"]})
                  for k in range(final_seeds) for reg in regularizers]
        records, _ = run_trials(trials, output_dir / label, workers, name=f"final {label}")
        finals += records
        results[label] = summarise(records, regularizers, chosen)
        if has_forgetting(records):
            fronts[label] = _front(records, output_dir / label, max_forgetting, label)
    _write_csv(finals, output_dir / "compare.csv")
    (output_dir / "compare.json").write_text(json.dumps({"results": results, "selections": selections,
                                                         "fronts": fronts}, indent=1, default=str))
    (output_dir / "report.md").write_text(markdown(results, regularizers, options, fronts, max_forgetting))
    plots = _plots(finals, output_dir, regularizers)
    return {"results": results, "selections": selections, "plots": plots, "fronts": fronts}


def _front(records: list[dict], folder: Path, max_forgetting: float | None, label: str) -> dict:
    """The regularizers (each at its chosen value) on test accuracy against forgetting, and the best one within the
    budget."""
    points = settings(records, "test_accuracy", key=lambda r: r["regularizer"])
    kept = within_budget(points, max_forgetting, "regularizer")
    best = max(kept, key=lambda p: p["target"])
    write_front(points, folder, "test accuracy", f"{label} images per class: test accuracy against forgetting")
    return {"points": points, "best_within_budget": best["setting"], "max_forgetting": max_forgetting,
            "best_description": describe(best)}


def summarise(records: list[dict], regularizers: list[str], chosen: dict) -> dict:
    from .analysis import paired

    by_reg = {reg: {r["seed"]: r for r in records if r["regularizer"] == reg} for reg in regularizers}
    base = by_reg[regularizers[0]]
    out = {}
    for reg in regularizers:
        accuracies = [r["test_accuracy"] for r in by_reg[reg].values()]
        out[reg] = {"value": chosen[reg]["value"], "learning_rate": chosen[reg]["learning_rate"],
                    "selection_margin": chosen[reg]["margin"], "n": len(accuracies),
                    "resolution_note": resolution_note(chosen[reg], f"`{reg}`"),
                    "test_mean": statistics.fmean(accuracies),
                    "test_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                    "drift_mean": statistics.fmean(r["drift"] for r in by_reg[reg].values()),
                    "forgetting_mean": _mean_or_none([r.get("forgetting") for r in by_reg[reg].values()]),
                    "paired": None if reg == regularizers[0] else paired(by_reg[reg], base)}
    return out


def _mean_or_none(values: list) -> float | None:
    return statistics.fmean(values) if values and all(v is not None for v in values) else None


def markdown(results: dict, regularizers: list[str], options: dict, fronts: dict | None = None,
             max_forgetting: float | None = None) -> str:
    lines = ["# hf-l2sp compare", "",
             f"Model `{options.get('model_name_or_path')}`, data `{options.get('dataset_name')}`. Each regularizer "
             "was tuned on its own grid on validation accuracy only; the final runs share their seeds (same subset, "
             "validation carve and head init per seed) and are the only runs evaluated on test.", ""]
    for label, table in results.items():
        front = (fronts or {}).get(label)
        retention = front is not None
        lines += [f"## {label} images per class" if label != "all" else "## all training images", "",
                  f"| regularizer | chosen value | lr | test accuracy (%) | vs {regularizers[0]}: mean diff, "
                  "wins/losses, p | selection margin | drift |" + (" forgetting |" if retention else ""),
                  "| --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if retention else "")]
        for reg in regularizers:
            row = table[reg]
            pair = row["paired"]
            versus = "-" if pair is None else (f"{100 * pair['mean']:+.1f} ({pair['wins']}/{pair['losses']}"
                                               + (f", p {pair['p']:.2f})" if pair["p"] is not None else ")"))
            margin = "-" if row["selection_margin"] is None else f"{100 * row['selection_margin']:.1f}"
            value = "-" if row["value"] is None else f"{row['value']:g}"
            lines.append(f"| `{reg}` | {value} | {row['learning_rate']:g} | {100 * row['test_mean']:.1f} ± "
                         f"{100 * row['test_std']:.1f} (n={row['n']}) | {versus} | {margin} | "
                         f"{row['drift_mean']:.3g} |" + (f" {row['forgetting_mean']:.4g} |" if retention else ""))
        lines.append("")
        if retention:
            on_front = ", ".join(f"`{p['setting']}`" for p in front["points"] if p["on_front"])
            budget = ("" if max_forgetting is None else
                      f" Within --max_forgetting {max_forgetting:g}, the best test accuracy is `{front['best_within_budget']}`.")
            lines += [f"Forgetting: the retention set's mean change since the start (0 = nothing forgotten). "
                      f"On the front of test accuracy against forgetting: {on_front}.{budget}", "",
                      f"![test accuracy against forgetting]({label}/front.png)", ""]
        notes = [table[reg]["resolution_note"] for reg in regularizers if table[reg].get("resolution_note")]
        if notes:
            lines += ["**The validation split is too small to resolve the selections:**", "",
                      *(f"- {note}" for note in notes), ""]
    lines += ["p: paired t-test over the seeds (scipy), absent without scipy or with identical results. Selection "
              "margin: best minus runner-up mean validation accuracy on the grid, in points; ties go to the lower "
              "validation loss, then the smaller value. Drift: relative "
              "distance ||w - w0|| / ||w0|| of the fine-tuned backbone.", "",
              "![test accuracy](accuracy.png)", "![per-layer drift](drift.png)", ""]
    return "\n".join(lines)


def _write_csv(records: list[dict], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FINAL_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)


def _plots(records: list[dict], output_dir: Path, regularizers: list[str]) -> list[str]:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return []
    from .analysis import plot_accuracy, plot_drift

    sized = [{**r, "size": r["size"] or r["train_images"]} for r in records]
    if len({r["size"] for r in sized}) > 1:
        plot_accuracy(sized, output_dir / "accuracy.png")  # accuracy against the training size
    else:
        _plot_one_size(sized, output_dir / "accuracy.png", regularizers)
    plot_drift(sized, output_dir / "drift.png", regularizers=tuple(regularizers))
    return ["accuracy.png", "drift.png"]


def _plot_one_size(records: list[dict], path: Path, regularizers: list[str]) -> None:
    """Test accuracy per regularizer: every seed, the mean and the standard deviation; paired seeds joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 + 1.1 * len(regularizers)), 3.6), dpi=110)
    by_seed: dict[int, list[tuple[int, float]]] = {}
    for i, reg in enumerate(regularizers):
        values = [(r["seed"], 100 * r["test_accuracy"]) for r in records if r["regularizer"] == reg]
        for seed, value in values:
            by_seed.setdefault(seed, []).append((i, value))
        accuracies = [v for _, v in values]
        spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        ax.errorbar([i + 0.15], [statistics.fmean(accuracies)], yerr=[spread], marker="o", capsize=3, color="k")
    for points in by_seed.values():  # one line per seed: the paired comparison
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", lw=0.7, alpha=0.5)
    ax.set_xticks(range(len(regularizers)), regularizers)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{records[0]['size']} images per class: seeds (lines), mean +- std", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
