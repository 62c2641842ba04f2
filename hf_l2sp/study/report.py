"""Study outputs from the run records: results.csv (every run), runs.jsonl (every record, per-layer drift included),
results.md (tables), accuracy.png and drift.png."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

from ..tuning.analysis import cells, listing_position, mean_std, paired, plot_accuracy, plot_drift
from .protocol import GRID_PARAMETER

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
        for record in sorted(records, key=lambda r: (r["phase"], r["setting"], listing_position(r["regularizer"]),
                                                     r["size"], r["seed"], r["grid_value"], r["learning_rate"])):
            writer.writerow({c: record.get(c, "") if record.get(c) is not None else "" for c in CSV_COLUMNS})


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown(records: list[dict], selection: dict, meta: dict) -> str:
    table = cells(records)
    settings = list(selection)
    sizes = sorted({size for (_, _, size) in table})
    regs = sorted({reg for (_, reg, _) in table}, key=listing_position)
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
                    m, s = mean_std([r["test_accuracy"] for r in cell.values()])
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
                         f"{_pct(choice['std_val'])} | {margin} | "
                         f"{', '.join(f'{v:g}' for v in choice['split_choices'])} | {choice['agreement']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def _grid(choice: dict) -> str:
    return ", ".join(f"{v:g}: {_pct(m)}" for v, m in choice["grid"])


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
