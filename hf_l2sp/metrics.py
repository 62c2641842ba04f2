"""Top-1 / top-5 accuracy for Trainer's compute_metrics, computed with numpy (works offline)."""

from __future__ import annotations

import numpy as np
from transformers import EvalPrediction


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Share of rows whose label is among the k largest logits (ties broken by index)."""
    if logits.shape[0] == 0:
        raise ValueError("Cannot compute accuracy on an empty evaluation set.")
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """`accuracy` (top-1) always; `top5_accuracy` when there are at least 5 classes."""
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    logits, labels = np.asarray(logits), np.asarray(prediction.label_ids)
    metrics = {"accuracy": topk_accuracy(logits, labels, 1)}
    if logits.shape[1] >= 5:
        metrics["top5_accuracy"] = topk_accuracy(logits, labels, 5)
    return metrics
