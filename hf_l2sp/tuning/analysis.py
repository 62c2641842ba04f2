"""Reading finished runs: paired differences on shared seeds and the accuracy and drift plots, for `compare` and
the study's report."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path

from ..penalties import all_names


def listing_position(regularizer: str) -> int:
    """Where a regularizer (or combination) goes in tables: the registry's listing order, unknown names last."""
    names = all_names()
    first = regularizer.split("+")[0]
    return names.index(first) if first in names else len(names)


def cells(records: list[dict]) -> dict[tuple[str, str, int], dict[int, dict]]:
    """Final runs as {(setting, regularizer, size): {seed: record}}."""
    table: dict[tuple[str, str, int], dict[int, dict]] = defaultdict(dict)
    for r in records:
        if r["phase"] == "final":
            table[(r["setting"], r["regularizer"], r["size"])][r["seed"]] = r
    return table


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired(cell: dict[int, dict], base: dict[int, dict]) -> dict | None:
    """Test-accuracy difference to the baseline on the same seeds (same subsets, splits and head init)."""
    seeds = sorted(set(cell) & set(base))
    if not seeds:
        return None
    diffs = [cell[s]["test_accuracy"] - base[s]["test_accuracy"] for s in seeds]
    mean, std = mean_std(diffs)
    p = None
    if len(diffs) > 1 and std > 0:
        from scipy import stats

        p = float(stats.ttest_rel([cell[s]["test_accuracy"] for s in seeds],
                                  [base[s]["test_accuracy"] for s in seeds]).pvalue)
    return {"mean": mean, "std": std, "n": len(diffs), "wins": sum(d > 0 for d in diffs),
            "losses": sum(d < 0 for d in diffs), "p": p}


def plot_accuracy(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = cells(records)
    settings = sorted({s for (s, _, _) in table})
    fig, axes = plt.subplots(1, len(settings), figsize=(5.2 * len(settings), 4), dpi=110, squeeze=False)
    for ax, setting in zip(axes[0], settings):
        regs = sorted({r for (s, r, _) in table if s == setting}, key=listing_position)
        for i, reg in enumerate(regs):
            sizes = sorted(n for (s, r, n) in table if s == setting and r == reg)
            stats_ = [mean_std([x["test_accuracy"] for x in table[(setting, reg, n)].values()]) for n in sizes]
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
