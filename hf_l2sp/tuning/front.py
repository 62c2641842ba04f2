"""Target against forgetting: the settings of a search or a comparison on both axes, their Pareto front, and the
best target among the settings whose forgetting stays within a budget (`--max_forgetting`).

A setting's target is its mean accuracy (validation in a search, test in a comparison's final runs) and its
forgetting the mean forgetting of the retention set (`retention_dataset`) over its seeds. A setting is on the front
when no other has a target at least as high and a forgetting at least as low, one of them strictly.
"""

from __future__ import annotations

import csv
import logging
import statistics
from collections import defaultdict
from pathlib import Path

from ..utils.errors import ConfigError

logger = logging.getLogger("hf_l2sp.tuning")
FRONT_FIELDS = ("setting", "value", "learning_rate", "target", "forgetting", "n", "on_front", "within_budget")


def has_forgetting(rows: list[dict]) -> bool:
    return bool(rows) and all(r.get("forgetting") is not None for r in rows)


def settings(rows: list[dict], target: str, key=lambda r: (r.get("regularizer"), r["value"], r["learning_rate"]),
             label=lambda r: r.get("regularizer")) -> list[dict]:
    """Mean `target` and mean forgetting of each setting (rows grouped by `key`)."""
    grouped: dict = defaultdict(list)
    for row in rows:
        grouped[key(row)].append(row)
    out = []
    for group in grouped.values():
        first = group[0]
        out.append({"setting": label(first), "value": first.get("value"), "learning_rate": first.get("learning_rate"),
                    "target": statistics.fmean(r[target] for r in group),
                    "forgetting": statistics.fmean(r["forgetting"] for r in group), "n": len(group)})
    return mark_front(out)


def mark_front(points: list[dict]) -> list[dict]:
    """Sets `on_front` on each point: not dominated in (higher target, lower forgetting)."""
    for p in points:
        p["on_front"] = not any(
            q is not p and q["target"] >= p["target"] and q["forgetting"] <= p["forgetting"]
            and (q["target"] > p["target"] or q["forgetting"] < p["forgetting"]) for q in points)
    return points


def within_budget(points: list[dict], max_forgetting: float | None, what: str) -> list[dict]:
    """The points whose forgetting is at most `max_forgetting` (all without a budget); refuses when none is."""
    for p in points:
        p["within_budget"] = max_forgetting is None or p["forgetting"] <= max_forgetting
    kept = [p for p in points if p["within_budget"]]
    if not kept:
        least = min(points, key=lambda p: p["forgetting"])
        raise ConfigError(f"No {what} keeps forgetting within --max_forgetting {max_forgetting:g}: the least "
                          f"forgetting was {least['forgetting']:.4g} ({describe(least)}). Raise the budget, or add "
                          "stronger settings (larger alpha values, lower learning rates).")
    return kept


def describe(point: dict) -> str:
    value = "" if point.get("value") is None else f" {point['value']:g}"
    lr = "" if point.get("learning_rate") is None else f" lr {point['learning_rate']:g}"
    return f"{point['setting']}{value}{lr}"


def write_front(points: list[dict], folder: Path, target_label: str, title: str) -> list[str]:
    """`front.csv` (every setting, both axes, on_front, within_budget) and, with matplotlib, `front.png`."""
    with (folder / "front.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FRONT_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(points)
    try:
        import matplotlib
    except ImportError:
        logger.warning("hf_l2sp: matplotlib is not installed, so front.png is not drawn (front.csv has the numbers).")
        return ["front.csv"]
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 4.0), dpi=110)
    for name in dict.fromkeys(p["setting"] for p in points):
        mine = [p for p in points if p["setting"] == name]
        ax.scatter([p["forgetting"] for p in mine], [100 * p["target"] for p in mine], s=18, label=name)
        for p in mine:
            if p.get("value") is not None:
                ax.annotate(f"{p['value']:g}", (p["forgetting"], 100 * p["target"]), fontsize=6,
                            xytext=(3, 2), textcoords="offset points")
    front = sorted((p for p in points if p["on_front"]), key=lambda p: p["forgetting"])
    ax.plot([p["forgetting"] for p in front], [100 * p["target"] for p in front], color="k", lw=0.8,
            label="Pareto front")
    ax.set_xlabel("forgetting of the retention set (lower keeps more)")
    ax.set_ylabel(f"{target_label} (%)")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "front.png")
    plt.close(fig)
    return ["front.csv", "front.png"]
