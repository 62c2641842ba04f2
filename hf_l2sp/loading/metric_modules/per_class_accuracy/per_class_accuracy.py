"""Accuracy of each class and their mean, as an `evaluate` metric module (loaded by path, works offline).

    accuracy_c = (1/n_c) sum_{i: y_i = c} [yhat_i = c]          mean_per_class_accuracy = (1/C') sum_c accuracy_c

over the C' classes present among the references (a class with no sample has no accuracy).
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Per-class accuracy (recall of each class) and its mean over the classes present."
_KWARGS = """
Args:
    predictions: the predicted class index of each sample.
    references: the true class index of each sample.
    num_classes: number of classes (default: 1 + the largest index seen).
Returns:
    {"mean_per_class_accuracy": float, "per_class": [{"class": c, "count": n_c, "correct": k_c,
     "accuracy": float or None}, ...]}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class PerClassAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, num_classes=None):
        predicted, labels = np.asarray(predictions), np.asarray(references)
        classes = int(num_classes or max(predicted.max(initial=-1), labels.max(initial=-1)) + 1)
        count = np.bincount(labels, minlength=classes)
        correct = np.bincount(labels[predicted == labels], minlength=classes)
        rows = [{"class": c, "count": int(count[c]), "correct": int(correct[c]),
                 "accuracy": float(correct[c] / count[c]) if count[c] else None} for c in range(classes)]
        present = [r["accuracy"] for r in rows if r["accuracy"] is not None]
        return {"mean_per_class_accuracy": float(np.mean(present)) if present else float("nan"), "per_class": rows}
