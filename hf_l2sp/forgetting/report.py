"""What a run's logs say about forgetting: the target's gain and each retention set's change from the start to the
end (the model card's table, `retention.json`), and the curves against the step (`forgetting.png`).

Everything here reads `Trainer.state.log_history` only: the card shows what was logged, nothing recomputed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)
RETENTION_JSON = "retention.json"
FORGETTING_PNG = "forgetting.png"
#: The logged metric each measure reports beside its forgetting.
MEASURE_METRIC = {"loss": "loss", "agreement": "agreement", "source_accuracy": "source_accuracy", "cka": "cka"}


def _series(log_history: list[dict], key: str) -> list[tuple[int, float]]:
    return [(entry.get("step", 0), float(entry[key])) for entry in log_history if key in entry]


def target_metric(log_history: list[dict], excluded: list[str], preferred: str | None = None) -> str | None:
    """The target's metric in the logs: `metric_for_best_model` when logged, else an accuracy, else a loss, of an
    evaluation set that is not a retention set."""
    keys = sorted({k for entry in log_history for k in entry if k.startswith("eval_")})
    if preferred:
        wanted = preferred if preferred.startswith("eval_") else f"eval_{preferred}"
        if wanted in keys:
            return wanted
    own = [k for k in keys if not any(k.startswith(f"eval_{name}_") for name in excluded)]
    for suffix in ("_accuracy", "_loss"):
        found = [k for k in own if k.endswith(suffix) and not k.endswith("top5_accuracy")]
        if found:
            return min(found, key=len)  # eval_accuracy before eval_x_accuracy
    return None


def retention_summary(log_history: list[dict], measures: dict[str, str], kl_set: str | None = None,
                      preferred: str | None = None) -> dict:
    """{target, sets, kl}: start and end values as logged (start: the first evaluation, before any step)."""
    target = None
    key = target_metric(log_history, list(measures), preferred)
    if key is not None:
        values = _series(log_history, key)
        lower_better = key.endswith("loss")
        start, end = values[0][1], values[-1][1]
        target = {"metric": key, "start": start, "end": end, "start_step": values[0][0], "end_step": values[-1][0],
                  "gain": (start - end) if lower_better else (end - start), "higher_is_better": not lower_better}
    sets = []
    for name, measure in measures.items():
        forgetting = _series(log_history, f"eval_{name}_forgetting")
        metric = _series(log_history, f"eval_{name}_{MEASURE_METRIC[measure]}")
        if not forgetting:
            continue
        sets.append({"name": name, "measure": measure, "metric": f"eval_{name}_{MEASURE_METRIC[measure]}",
                     "start": metric[0][1] if metric else None, "end": metric[-1][1] if metric else None,
                     "forgetting": forgetting[-1][1], "step": forgetting[-1][0]})
    kl = None
    if kl_set is not None and (values := _series(log_history, f"eval_{kl_set}_kl")):
        kl = {"name": kl_set, "end": values[-1][1], "step": values[-1][0]}
    return {"target": target, "sets": sets, "kl": kl}


def save_retention(log_history: list[dict], measures: dict[str, str], folder: str | Path, kl_set: str | None = None,
                   preferred: str | None = None, title: str = "") -> dict:
    """Write `retention.json` and, with matplotlib, `forgetting.png`; returns the summary (`plot` set if drawn)."""
    folder = Path(folder)
    summary = retention_summary(log_history, measures, kl_set, preferred)
    if plot_forgetting(log_history, summary, folder / FORGETTING_PNG, title):
        summary["plot"] = FORGETTING_PNG
    (folder / RETENTION_JSON).write_text(json.dumps(summary, indent=2))
    return summary


def plot_forgetting(log_history: list[dict], summary: dict, path: Path, title: str = "") -> bool:
    """The target's metric (left) and every retention set's forgetting, and the KL, (right) against the step."""
    try:
        import matplotlib
    except ImportError:
        logger.warning("hf_l2sp: matplotlib is not installed, so %s is not drawn (%s has the numbers).", path.name,
                       RETENTION_JSON)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=110)

    def curve(ax, key, **style):
        """The evaluations during training as a line; a later evaluation at the last step (the saved model after
        load_best_model_at_end, say) as a star."""
        series = _series(log_history, key)
        during = list({step: (step, value) for step, value in reversed(series)}.values())[::-1]
        line = ax.plot(*zip(*during), ms=3, **style)[0]
        if len(series) > len(during):
            ax.scatter([series[-1][0]], [series[-1][1]], marker="*", s=60, color=line.get_color(), zorder=3)

    if summary["target"] is not None:
        curve(left, summary["target"]["metric"], marker="o", color="k")
        left.set_ylabel(summary["target"]["metric"])
    left.set_title("target (star: the saved model, when evaluated again)", fontsize=9)
    for row in summary["sets"]:
        curve(right, f"eval_{row['name']}_forgetting", marker="o", label=f"{row['name']} ({row['measure']})")
    if summary["kl"] is not None:
        curve(right, f"eval_{summary['kl']['name']}_kl", marker="s", ls="--",
              label=f"KL to start on {summary['kl']['name']}")
    right.axhline(0.0, color="0.7", lw=0.8)
    right.set_ylabel("forgetting (0 at the start; > 0 is worse)")
    right.set_title("retention sets", fontsize=9)
    if summary["sets"] or summary["kl"]:
        right.legend(fontsize=7)
    for ax in (left, right):
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
