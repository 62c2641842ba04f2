"""Classification metrics through `evaluate` modules shipped inside the package (loaded by path: works offline).

`hf_l2sp/loading/metric_modules/` holds `top_k_accuracy` (top-1 / top-5 from the logits) and `per_class_accuracy` (each
class's accuracy and their mean). Training (`compute_metrics`) and `hf-l2sp evaluate` (`classification_metrics`)
both use them, so a run's logged test accuracy and a later evaluation of its checkpoint are the same computation.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
from transformers import EvalPrediction

from ..utils.errors import ConfigError

METRIC_MODULES = ("top_k_accuracy", "per_class_accuracy")


def metric_module_path(name: str) -> Path:
    if name not in METRIC_MODULES:
        raise ConfigError(f"Unknown metric module {name!r}; shipped: {', '.join(METRIC_MODULES)}.")
    return Path(str(resources.files("hf_l2sp") / "loading" / "metric_modules" / name))


@lru_cache(maxsize=None)
def load_metric(name: str):
    """The shipped `evaluate` module `name`, loaded by path once per process (kept in memory: no cache files)."""
    import evaluate

    return evaluate.load(str(metric_module_path(name)), keep_in_memory=True)


def classification_metrics(logits: np.ndarray, labels: np.ndarray, num_classes: int | None = None) -> dict:
    """`accuracy` (top-1), `top5_accuracy` (5+ classes), `mean_per_class_accuracy` and the `per_class` table."""
    logits, labels = np.asarray(logits, dtype=np.float32), np.asarray(labels)
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ConfigError(f"Cannot compute accuracy on an empty evaluation set (logits of shape {logits.shape}).")
    num_classes = num_classes or logits.shape[1]
    top = load_metric("top_k_accuracy").compute(predictions=logits, references=labels, k=[1, 5])
    per_class = load_metric("per_class_accuracy").compute(predictions=logits.argmax(1), references=labels,
                                                          num_classes=num_classes)
    metrics = {"accuracy": top["top1_accuracy"]}
    if "top5_accuracy" in top:
        metrics["top5_accuracy"] = top["top5_accuracy"]
    metrics["mean_per_class_accuracy"] = per_class["mean_per_class_accuracy"]
    metrics["per_class"] = per_class["per_class"]
    return metrics


def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """Trainer's `compute_metrics`: the scalar metrics of `classification_metrics` (no per-class table in logs)."""
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    metrics = classification_metrics(logits, prediction.label_ids)
    metrics.pop("per_class")
    return metrics


def bootstrap_interval(correct: np.ndarray, labels: np.ndarray, num_classes: int, samples: int = 1000,
                       level: float = 0.95, seed: int = 0,
                       correct_top5: np.ndarray | None = None) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals (resampling the evaluated images) of top-1, top-5 (when `correct_top5` is
    given) and mean per-class accuracy."""
    rng = np.random.default_rng(seed)
    n = len(correct)
    top1, top5, per_class = np.empty(samples), np.empty(samples), np.empty(samples)
    for s in range(samples):
        index = rng.integers(0, n, n)
        c, y = correct[index], labels[index]
        top1[s] = c.mean()
        if correct_top5 is not None:
            top5[s] = correct_top5[index].mean()
        count = np.bincount(y, minlength=num_classes)
        hits = np.bincount(y[c], minlength=num_classes)
        present = count > 0
        per_class[s] = (hits[present] / count[present]).mean()
    tail = 100 * (1 - level) / 2
    series = [("accuracy", top1), ("mean_per_class_accuracy", per_class)]
    if correct_top5 is not None:
        series.append(("top5_accuracy", top5))
    return {name: (float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))) for name, v in series}
