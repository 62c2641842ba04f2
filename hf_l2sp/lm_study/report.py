"""The language-model study's outputs, from its run records: results.csv (every point), matched.csv (each method
against a lower or higher learning rate at the same target gain, paired by seed), results.md and front.png.

Matching. A learning rate is what most users turn instead of adding a penalty, so plain fine-tuning over its
learning-rate grid is the reference curve: per seed, the points (target gain, forgetting) of plain runs, with w0 at
(0, 0) as the learning rate's limit at zero, less any point another of them beats on both axes (a learning rate so
high that it loses target accuracy too), joined by straight lines in gain order. Each method's point is compared
with that curve at its own gain, on its own seed; the differences over seeds give a mean and a 95 % t-interval.
A point whose gain lies beyond every plain run's is not matched (it gained more than any learning rate did).
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

COLUMNS = ["seed", "method", "family", "learning_rate", "alpha", "lora_rank", "replay", "mix", "tokens",
           "target_loss", "target_gain", "wikipedia_loss", "news_loss", "wikipedia_forgetting", "news_forgetting",
           "forgetting", "kl", "distance", "train_seconds"]
MATCHED_COLUMNS = ["method", "seeds", "matched", "target_gain", "forgetting", "plain_forgetting",
                   "forgetting_difference", "forgetting_low", "forgetting_high", "kl", "plain_kl", "kl_difference",
                   "kl_low", "kl_high"]
REFERENCE = "plain"
# Two-sided 95 % Student t quantiles by degrees of freedom (n - 1 seeds).
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


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
    """The seed's plain points and w0 that no other of them beats on both axes, in gain order."""
    points = [(0.0, 0.0)] + [(r["target_gain"], r[key]) for r in records
                             if r["family"] == REFERENCE and r["seed"] == seed and r["mix"] == 1.0]
    front = [p for p in points
             if not any(q != p and q[0] >= p[0] and q[1] <= p[1] for q in points)]
    return sorted(set(front))


def at_gain(curve: list[tuple[float, float]], gain: float) -> float | None:
    """The curve's value at `gain` by linear interpolation; None beyond its largest gain (below 0: its first piece,
    extended, as a point that lost target accuracy is compared with w0's neighbourhood)."""
    if gain > curve[-1][0]:
        return None
    for (g0, v0), (g1, v1) in zip(curve, curve[1:]):
        if gain <= g1:
            return v0 if g1 == g0 else v0 + (v1 - v0) * (gain - g0) / (g1 - g0)
    return curve[-1][1]


def interval(values: list[float]) -> tuple[float, float, float]:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = T_975.get(len(values) - 1, 1.96) * statistics.stdev(values) / len(values) ** 0.5
    return mean, mean - half, mean + half


def matched(records: list[dict]) -> list[dict]:
    """One row per method other than plain: its mean point and its paired difference to plain at the same gain."""
    rows = []
    for method in sorted({r["method"] + f"@{r['mix']:g}" for r in records if r["family"] != REFERENCE}):
        name, mix = method.rsplit("@", 1)
        points = sorted((r for r in records if r["method"] == name and r["mix"] == float(mix)), key=_order)
        label = name if points[0]["family"] != "wise" else f"{name} (m={mix})"
        row = {"method": label, "seeds": len(points), "target_gain": statistics.fmean(p["target_gain"] for p in points),
               "forgetting": statistics.fmean(p["forgetting"] for p in points),
               "kl": statistics.fmean(p["kl"] for p in points)}
        for key, prefix in (("forgetting", "forgetting"), ("kl", "kl")):
            pairs = [(p[key], at_gain(plain_curve(records, p["seed"], key), p["target_gain"])) for p in points]
            pairs = [(value, plain) for value, plain in pairs if plain is not None]
            row["matched"] = len(pairs)
            if pairs:
                mean, low, high = interval([value - plain for value, plain in pairs])
                row[f"plain_{key}"] = statistics.fmean(plain for _, plain in pairs)
                row[f"{prefix}_difference"], row[f"{prefix}_low"], row[f"{prefix}_high"] = mean, low, high
            else:
                for column in (f"plain_{key}", f"{prefix}_difference", f"{prefix}_low", f"{prefix}_high"):
                    row[column] = float("nan")
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
    if row[f"{prefix}_difference"] != row[f"{prefix}_difference"]:  # nan: nothing matched
        return "beyond plain's gains"
    if row[f"{prefix}_low"] != row[f"{prefix}_low"]:
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
    lines += ["", "Against plain fine-tuning at the same target gain (its learning-rate curve through w0, per seed): the "
              "difference in forgetting and in KL, mean [95 % t-interval] over the matched seeds. Negative: the "
              "method forgets less than a learning rate that gains as much.", "",
              "| method | matched seeds | target gain | forgetting | plain at that gain | difference | KL difference |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in matched(records):
        plain = "—" if row["plain_forgetting"] != row["plain_forgetting"] else f"{row['plain_forgetting']:.4f}"
        lines.append(f"| {row['method']} | {row['matched']}/{row['seeds']} | {row['target_gain']:.4f} | "
                     f"{row['forgetting']:.4f} | {plain} | {_ci(row, 'forgetting')} | {_ci(row, 'kl')} |")
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
    write_csv(matched(records), output / "matched.csv", MATCHED_COLUMNS)
    (output / "results.md").write_text(markdown(records, start))
    plot_front(records, output / "front.png")
    return records
