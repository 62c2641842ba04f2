"""Top-k accuracy from class scores, as an `evaluate` metric module (loaded by path, works offline).

    accuracy@k = (1/n) sum_i [y_i is among the k highest scores of row i]   (ties broken by the lower class index)
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Share of samples whose reference class is among the k highest predicted scores."
_KWARGS = """
Args:
    predictions: per-sample class scores (logits or probabilities), one list of floats per sample.
    references: the true class index of each sample.
    k: an int or a list of ints (default [1, 5]); values larger than the number of classes are skipped.
Returns:
    {"top1_accuracy": float, "top5_accuracy": float, ...} for each k kept.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class TopKAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float32")),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, k=(1, 5)):
        scores, labels = np.asarray(predictions, dtype=np.float64), np.asarray(references)
        if scores.ndim != 2 or len(scores) == 0:
            raise ValueError(f"top_k_accuracy needs a (samples, classes) score matrix; got shape {scores.shape}.")
        order = np.argsort(-scores, axis=1, kind="stable")
        ks = [k] if isinstance(k, int) else list(k)
        return {f"top{kk}_accuracy": float((order[:, :kk] == labels[:, None]).any(axis=1).mean())
                for kk in ks if kk <= scores.shape[1]}
