"""The language-model study's outputs, from its run records: results.csv (every point), matched.csv (each method
against a lower or higher learning rate at the same target gain, paired by seed), results.md and front.png.

Matching. A learning rate is what most users turn instead of adding a penalty, so plain fine-tuning over its
learning-rate grid is the reference curve: per seed, the points (target gain, forgetting) of plain runs, with w0 at
(0, 0) as the learning rate's limit at zero (kept even where a small learning rate beats it on both axes), less any
plain point another point beats on both axes (a learning rate so high that it loses target accuracy too), joined by
straight lines in gain order. Each method's point is compared,
on its own seed, with
- that curve at its own gain when its gain lies within the curve's ("same gain");
- the seed's plain run of largest gain when it gained more than every plain run ("best plain"): the method then
  gained more, so a negative difference means it is better on both axes;
- w0 itself when it gained nothing ("w0"): w0 is then better on both axes unless the method forgot less than 0.
The differences over seeds give a mean and a 95 % t-interval.
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

from ..utils.intervals import interval

COLUMNS = ["seed", "method", "family", "learning_rate", "alpha", "lora_rank", "replay", "mix", "tokens",
           "target_loss", "target_gain", "wikipedia_loss", "news_loss", "wikipedia_forgetting", "news_forgetting",
           "forgetting", "kl", "distance", "train_seconds"]
MATCHED_COLUMNS = ["method", "seeds", "compared_with", "target_gain", "gain_difference", "gain_low", "gain_high",
                   "forgetting", "plain_forgetting",
                   "forgetting_difference", "forgetting_low", "forgetting_high", "kl", "plain_kl", "kl_difference",
                   "kl_low", "kl_high"]
REFERENCE = "plain"


def load_records(output: Path) -> list[dict]:
    records = []
    for path in sorted((Path(output) / "runs").rglob("*.json")):
        records.extend(json.loads(path.read_text()))
    return records


def read_csv(path: Path) -> list[dict]:
    with Path(path).open() as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        for key, value in row.items():
            if key not in ("method", "family"):
                row[key] = float(value)
        row["seed"] = int(row["seed"])
    return rows


def write_csv(rows: list[dict], path: Path, columns: list[str]) -> None:
    with Path(path).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: (f"{row[c]:.6g}" if isinstance(row[c], float) else row[c]) for c in columns})


def _order(record: dict) -> tuple:
    return (record["method"], record["mix"], record["seed"])


def plain_curve(records: list[dict], seed: int, key: str) -> list[tuple[float, float]]:
    """w0, then the seed's plain points of positive gain that no other point (w0 included) beats on both axes, in
    gain order."""
    points = [(0.0, 0.0)] + [(r["target_gain"], r[key]) for r in records
                             if r["family"] == REFERENCE and r["seed"] == seed and r["mix"] == 1.0]
    front = [p for p in points[1:] if p[0] > 0
             and not any(q != p and q[0] >= p[0] and q[1] <= p[1] for q in points)]
    return [(0.0, 0.0)] + sorted(set(front))  # w0 stays: the curve starts where a learning rate of 0 leaves it


def reference(curve: list[tuple[float, float]], gain: float) -> tuple[float, str]:
    """What a point of this gain is compared with on the plain curve, and which kind of comparison it is."""
    if gain <= 0:
        return 0.0, "w0"
    if gain >= curve[-1][0]:
        return curve[-1][1], "best plain"
    for (g0, v0), (g1, v1) in zip(curve, curve[1:]):
        if gain <= g1:
            return v0 + (v1 - v0) * (gain - g0) / (g1 - g0), "same gain"
    raise AssertionError("unreachable: gain lies within the curve")


def matched(records: list[dict]) -> list[dict]:
    """One row per method other than plain: its mean point and its paired difference to plain (see `reference`)."""
    rows = []
    for method in sorted({r["method"] + f"@{r['mix']:g}" for r in records if r["family"] != REFERENCE}):
        name, mix = method.rsplit("@", 1)
        points = sorted((r for r in records if r["method"] == name and r["mix"] == float(mix)), key=_order)
        label = name if points[0]["family"] != "wise" else f"{name} (m={mix})"
        row = {"method": label, "seeds": len(points), "target_gain": statistics.fmean(p["target_gain"] for p in points),
               "forgetting": statistics.fmean(p["forgetting"] for p in points),
               "kl": statistics.fmean(p["kl"] for p in points)}
        # The gain of what each point is compared with: its own (on the curve), the best plain run's, or w0's 0.
        gains = [0.0 if p["target_gain"] <= 0 else min(p["target_gain"], plain_curve(records, p["seed"], "forgetting")[-1][0])
                 for p in points]
        row["gain_difference"], row["gain_low"], row["gain_high"] = interval(
            [p["target_gain"] - gain for p, gain in zip(points, gains)])
        for key in ("forgetting", "kl"):
            pairs = [(p[key], *reference(plain_curve(records, p["seed"], key), p["target_gain"])) for p in points]
            mean, low, high = interval([value - plain for value, plain, _ in pairs])
            row[f"plain_{key}"] = statistics.fmean(plain for _, plain, _ in pairs)
            row[f"{key}_difference"], row[f"{key}_low"], row[f"{key}_high"] = mean, low, high
            if key == "forgetting":
                kinds = [kind for _, _, kind in pairs]
                row["compared_with"] = ", ".join(f"{kind} ×{kinds.count(kind)}" for kind in dict.fromkeys(kinds))
        rows.append(row)
    return rows


def summary(records: list[dict]) -> list[dict]:
    rows = []
    for method in sorted({(r["method"], r["mix"]) for r in records}):
        points = [r for r in records if (r["method"], r["mix"]) == method]
        row = {"method": method[0] if points[0]["family"] != "wise" else f"{method[0]} (m={method[1]:g})",
               "seeds": len(points)}
        for key in ("target_gain", "wikipedia_forgetting", "news_forgetting", "forgetting", "kl", "distance"):
            values = [p[key] for p in points]
            row[key] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
        rows.append(row)
    return rows


def _pm(pair: tuple[float, float]) -> str:
    return f"{pair[0]:.4f} ± {pair[1]:.4f}"


def _ci(row: dict, prefix: str) -> str:
    if row[f"{prefix}_low"] != row[f"{prefix}_low"]:  # nan: one seed
        return f"{row[f'{prefix}_difference']:+.4f} (one seed)"
    return f"{row[f'{prefix}_difference']:+.4f} [{row[f'{prefix}_low']:+.4f}, {row[f'{prefix}_high']:+.4f}]"


def markdown(records: list[dict], start: dict | None) -> str:
    lines = []
    if start:
        lines += ["| weights | target loss | wikipedia loss | news loss |", "| --- | --- | --- | --- |"]
        for label, key in (("dequantised 4-bit", "before_healing"), ("healed (w0)", "healed")):
            v = start[key]
            lines.append(f"| {label} | {v['target_loss']:.4f} | {v['wikipedia_loss']:.4f} | {v['news_loss']:.4f} |")
        lines.append("")
    lines += ["Mean ± standard deviation over seeds. Gain: the target's loss drop (nats per token; higher is better). "
              "Forgetting: the retention sets' loss rise (mean of the two; lower is better). KL: per token, from w0, "
              "on target text.", "",
              "| method | seeds | target gain | wikipedia forgetting | news forgetting | forgetting | KL | ‖w − w0‖ |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in summary(records):
        lines.append(f"| {row['method']} | {row['seeds']} | {_pm(row['target_gain'])} | "
                     f"{_pm(row['wikipedia_forgetting'])} | {_pm(row['news_forgetting'])} | {_pm(row['forgetting'])} | "
                     f"{_pm(row['kl'])} | {row['distance'][0]:.2f} |")
    lines += ["", "Against plain fine-tuning, paired by seed: the difference in forgetting and in KL, mean [95 % "
              "t-interval]. Compared with: plain's learning-rate curve (through w0) at the method's own gain (same "
              "gain); plain's run of largest gain when the method gained more than all of them (best plain: a "
              "negative difference then means better on both axes); w0 when the method gained nothing (w0). "
              "Gain difference: the method's gain minus that of what it is compared with. Negative differences in "
              "forgetting and KL: the method forgets less.", "",
              "| method | compared with | target gain | gain difference | forgetting | plain | difference | "
              "KL difference |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in matched(records):
        gain = "0 (same gain)" if row["compared_with"].startswith("same gain") and "," not in row["compared_with"] \
            else _ci(row, "gain")
        lines.append(f"| {row['method']} | {row['compared_with']} | {row['target_gain']:.4f} | {gain} | "
                     f"{row['forgetting']:.4f} | {row['plain_forgetting']:.4f} | {_ci(row, 'forgetting')} | "
                     f"{_ci(row, 'kl')} |")
    return "\n".join(lines) + "\n"


COLOURS = {"plain": "tab:gray", "l2_sp": "tab:red", "l2": "tab:blue", "lora": "tab:green", "lora_l2_sp": "tab:olive",
           "replay": "tab:purple", "wise": "tab:orange"}


def plot_front(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for ax, key, label in ((axes[0], "forgetting", "forgetting (retention loss rise, nats/token)"),
                           (axes[1], "kl", "KL(p_w0 ‖ p) on target text, per token")):
        for family, colour in COLOURS.items():
            points = sorted({(r["method"], r["mix"]) for r in records if r["family"] == family})
            xs, ys = [], []
            for method, mix in points:
                group = [r for r in records if (r["method"], r["mix"]) == (method, mix)]
                x = statistics.fmean(r["target_gain"] for r in group)
                y = statistics.fmean(r[key] for r in group)
                ax.scatter([r["target_gain"] for r in group], [r[key] for r in group], s=8, color=colour, alpha=0.3)
                xs.append(x)
                ys.append(y)
            if xs:
                order = sorted(range(len(xs)), key=lambda i: xs[i])
                style = "-o" if family in ("plain", "wise") else "o"
                ax.plot([xs[i] for i in order], [ys[i] for i in order], style, color=colour, label=family, ms=5)
        ax.scatter([0], [0], marker="*", s=90, color="black", label="w0", zorder=3)
        ax.set_xlabel("target gain (New Testament loss drop, nats/token)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M: target gain against what is lost (means over seeds; faint: single seeds)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(output: Path) -> list[dict]:
    output = Path(output)
    records = sorted(load_records(output), key=_order)
    start_path = output / "start.json"
    start = json.loads(start_path.read_text()) if start_path.exists() else None
    write_csv(records, output / "results.csv", COLUMNS)
    rows = read_csv(output / "results.csv")  # what is committed: the tables recompute from it exactly
    write_csv(matched(rows), output / "matched.csv", MATCHED_COLUMNS)
    (output / "results.md").write_text(markdown(rows, start))
    plot_front(rows, output / "front.png")
    return records


#: The committed full study, in a checkout (an installed wheel has none).
COMMITTED = Path(__file__).resolve().parents[2] / "docs" / "results" / "lm_study_files" / "results.csv"
COMPARED = ("target_gain", "forgetting", "kl")


def against_committed(records: list[dict], committed: Path = COMMITTED) -> list[str]:
    """Each record beside the committed full study's record of the same run (method, mix and seed), with the largest
    absolute difference over gain, forgetting and KL; empty when there is no committed file."""
    if not Path(committed).is_file():
        return []
    reference = {(r["method"], r["mix"], r["seed"]): r for r in read_csv(committed)}
    lines, worst = [], 0.0
    for record in sorted(records, key=_order):
        other = reference.get((record["method"], record["mix"], record["seed"]))
        if other is None:
            lines.append(f"{record['method']} (m={record['mix']:g}) seed {record['seed']}: not in {committed.name}")
            continue
        differences = [abs(record[key] - other[key]) for key in COMPARED]
        worst = max(worst, *differences)
        lines.append(f"{record['method']} (m={record['mix']:g}) seed {record['seed']}: "
                     + ", ".join(f"{key} {record[key]:.4f} (committed {other[key]:.4f})" for key in COMPARED))
    return lines + [f"largest difference from the committed study: {worst:.4f}"]

