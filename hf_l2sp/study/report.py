"""Study outputs from the run records: results.csv (every run), runs.jsonl (every record, per-layer drift included),
results.md (tables), accuracy.png and drift.png."""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from .protocol import GRID_PARAMETER, REGULARIZERS

CSV_COLUMNS = ["phase", "setting", "transfer", "dataset", "model", "regularizer", "size", "seed", "learning_rate",
               "steps", "grid_value", "sp_alpha", "sp_beta", "sp_delta_alpha", "sp_bss_eta", "train_images",
               "val_images", "test_images", "val_accuracy", "test_accuracy", "drift", "train_seconds",
               "wall_seconds", "key"]
BASELINE = "l2"


def load_records(results_dir: Path) -> list[dict]:
    records = []
    for path in sorted((Path(results_dir) / "runs").rglob("*.json")):
        records.append(json.loads(path.read_text()))
    return records


def write_csv(records: list[dict], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for record in sorted(records, key=lambda r: (r["phase"], r["setting"], _order(r["regularizer"]),
                                                     r["size"], r["seed"], r["grid_value"], r["learning_rate"])):
            writer.writerow({c: record.get(c, "") if record.get(c) is not None else "" for c in CSV_COLUMNS})


def _order(regularizer: str) -> int:
    return REGULARIZERS.index(regularizer) if regularizer in REGULARIZERS else len(REGULARIZERS)


def cells(records: list[dict]) -> dict[tuple[str, str, int], dict[int, dict]]:
    """Final runs as {(setting, regularizer, size): {seed: record}}."""
    table: dict[tuple[str, str, int], dict[int, dict]] = defaultdict(dict)
    for r in records:
        if r["phase"] == "final":
            table[(r["setting"], r["regularizer"], r["size"])][r["seed"]] = r
    return table


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired(cell: dict[int, dict], base: dict[int, dict]) -> dict | None:
    """Test-accuracy difference to the baseline on the same seeds (same subsets, splits and head init)."""
    seeds = sorted(set(cell) & set(base))
    if not seeds:
        return None
    diffs = [cell[s]["test_accuracy"] - base[s]["test_accuracy"] for s in seeds]
    mean, std = _mean_std(diffs)
    p = None
    if len(diffs) > 1 and std > 0:
        from scipy import stats

        p = float(stats.ttest_rel([cell[s]["test_accuracy"] for s in seeds],
                                  [base[s]["test_accuracy"] for s in seeds]).pvalue)
    return {"mean": mean, "std": std, "n": len(diffs), "wins": sum(d > 0 for d in diffs),
            "losses": sum(d < 0 for d in diffs), "p": p}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown(records: list[dict], selection: dict, meta: dict) -> str:
    table = cells(records)
    settings = list(selection)
    sizes = sorted({size for (_, _, size) in table})
    regs = sorted({reg for (_, reg, _) in table}, key=_order)
    lines = ["# Transfer study results", "", f"Command: `{meta.get('command', '?')}`", ""]
    for key in ("machine", "workers", "flush_denormal"):
        if key in meta:
            lines.append(f"- {key.replace('_', ' ')}: {meta[key]}")
    for run in meta.get("invocations", []):
        lines.append(f"- invocation {run['started']} at commit {run['git_commit']}: {run['runs_executed']} runs "
                     f"executed in {run['minutes']} min (`{run['command']}`)")
    lines += ["", "Test accuracy in %, mean ± std over seeds. Δ vs l2: paired difference in points on the same seeds "
              "(same training subset, validation carve and head init), with wins/losses and a paired t-test p. "
              "Drift: ||w - w0|| / ||w0|| over the pretrained tensors after fine-tuning, mean over seeds.", ""]
    for setting in settings:
        sel = selection[setting]
        info = sel.get("description", "")
        lr = sel["learning_rate"]
        lines += [f"## {setting}" + (f": {info}" if info else ""), ""]
        if "source" in sel and sel["source"]:
            lines += [f"Source model on its own task: {json.dumps(sel['source'])}", ""]
        lines += [f"Learning rate {lr['value']:g} " + ("(fixed, no search)" if lr.get("fixed") else
                  f"(chosen for plain fine-tuning on validation; grid {_grid(lr)}; split choices "
                  f"{list(lr['split_choices'])})"), ""]
        header = "| regularizer | chosen | " + " | ".join(f"{n}/class test" for n in sizes) + " | " + \
                 " | ".join(f"{n}/class Δ vs l2" for n in sizes) + " | " + \
                 " | ".join(f"{n}/class drift" for n in sizes) + " |"
        lines += [header, "|" + "---|" * (2 + 3 * len(sizes))]
        for reg in regs:
            choice = sel["regularizers"].get(reg, {})
            row = [reg, f"{GRID_PARAMETER.get(reg, '')}={choice.get('value', float('nan')):g}" if reg != "none"
                   else "-"]
            for size in sizes:
                cell = table.get((setting, reg, size), {})
                if cell:
                    m, s = _mean_std([r["test_accuracy"] for r in cell.values()])
                    row.append(f"{_pct(m)} ± {_pct(s)}")
                else:
                    row.append("")
            for size in sizes:
                comparison = paired(table.get((setting, reg, size), {}), table.get((setting, BASELINE, size), {}))
                if reg == BASELINE or comparison is None:
                    row.append("")
                else:
                    p = "" if comparison["p"] is None else f", p={comparison['p']:.2f}"
                    row.append(f"{100 * comparison['mean']:+.1f} ± {100 * comparison['std']:.1f} "
                               f"({comparison['wins']}/{comparison['losses']}{p})")
            for size in sizes:
                cell = table.get((setting, reg, size), {})
                row.append(f"{statistics.fmean(r['drift'] for r in cell.values()):.3f}" if cell else "")
            lines.append("| " + " | ".join(row) + " |")
        lines += ["", "Hyperparameter selection (validation accuracy in %, mean ± std over the selection splits):",
                  "", "| regularizer | grid (value: mean val) | chosen | val | runner-up margin | split choices | "
                      "agreement |", "|---|---|---|---|---|---|---|"]
        for reg in regs:
            choice = sel["regularizers"].get(reg, {})
            if choice.get("fixed") or "grid" not in choice:
                lines.append(f"| {reg} | fixed | {choice.get('value', '')} | | | | |")
                continue
            margin = "" if choice["margin"] is None else f"{100 * choice['margin']:.1f}"
            lines.append(f"| {reg} | {_grid(choice)} | {choice['value']:g} | {_pct(choice['mean_val'])} ± "
                         f"{_pct(choice['std_val'])} | {margin} | {', '.join(f'{v:g}' for v in choice['split_choices'])}"
                         f" | {choice['agreement']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def _grid(choice: dict) -> str:
    return ", ".join(f"{v:g}: {_pct(m)}" for v, m in choice["grid"])


def plot_accuracy(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = cells(records)
    settings = sorted({s for (s, _, _) in table})
    fig, axes = plt.subplots(1, len(settings), figsize=(5.2 * len(settings), 4), dpi=110, squeeze=False)
    for ax, setting in zip(axes[0], settings):
        regs = sorted({r for (s, r, _) in table if s == setting}, key=_order)
        for i, reg in enumerate(regs):
            sizes = sorted(n for (s, r, n) in table if s == setting and r == reg)
            stats_ = [_mean_std([x["test_accuracy"] for x in table[(setting, reg, n)].values()]) for n in sizes]
            jitter = [n * (1 + 0.025 * (i - len(regs) / 2)) for n in sizes]  # keep error bars apart
            ax.errorbar(jitter, [100 * m for m, _ in stats_], yerr=[100 * s for _, s in stats_], marker="o",
                        ms=3, capsize=2, lw=1.2 if reg in ("l2", "l2_sp") else 0.8, label=reg)
        ax.set_xscale("log")
        ax.set_xlabel("training images per class")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(setting, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_drift(records: list[dict], path: Path, regularizers=("none", "l2", "l2_sp")) -> None:
    """Per-layer relative drift from w0 of the conv and linear weights (mean over seeds) for plain FT, L2 and
    L2-SP: the paper's analysis. BatchNorm tensors are left out: their w0 can be ~0 (biases) and their scale is
    not what the penalties act on."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = cells(records)
    settings = sorted({s for (s, _, _) in table})
    sizes = sorted({n for (_, _, n) in table})
    fig, axes = plt.subplots(len(sizes), len(settings), figsize=(5.2 * len(settings), 2.6 * len(sizes)), dpi=110,
                             squeeze=False)
    for row, size in enumerate(sizes):
        for col, setting in enumerate(settings):
            ax = axes[row][col]
            for reg in regularizers:
                cell = table.get((setting, reg, size))
                if not cell:
                    continue
                keep = next(iter(cell.values()))["drift_layer_penalised"]
                layers = [[v for v, k in zip(r["drift_layers"], keep) if k] for r in cell.values()]
                mean = [statistics.fmean(v for v in values if v is not None) if any(v is not None for v in values)
                        else math.nan for values in zip(*layers)]
                ax.plot(range(len(mean)), mean, lw=1, marker=".", ms=2, label=reg)
            ax.set_yscale("log")
            ax.set_title(f"{setting}, {size}/class", fontsize=9)
            ax.set_ylabel("||w - w0|| / ||w0||", fontsize=8)
            ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("conv / linear weight (forward order)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(results_dir: Path, selection: dict, meta: dict) -> dict[str, Path]:
    results_dir = Path(results_dir)
    records = load_records(results_dir)
    paths = {"csv": results_dir / "results.csv", "records": results_dir / "runs.jsonl",
             "markdown": results_dir / "results.md",
             "accuracy_plot": results_dir / "accuracy.png", "drift_plot": results_dir / "drift.png"}
    write_csv(records, paths["csv"])
    paths["records"].write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    paths["markdown"].write_text(markdown(records, selection, meta))
    plot_accuracy(records, paths["accuracy_plot"])
    plot_drift(records, paths["drift_plot"])
    return paths
