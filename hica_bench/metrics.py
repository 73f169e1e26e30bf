"""Classification metrics (scikit-learn) following medmnist's Evaluator convention, and seed aggregation.

ACC is argmax accuracy. AUC: binary tasks use the positive-class probability; multi-class tasks the
one-vs-rest macro AUC. Also macro-F1 and balanced accuracy. Values are fractions in [0, 1].
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

METRICS = ("acc", "auc", "f1_macro", "balanced_acc")


def classification_metrics(labels: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    n_classes = proba.shape[1]
    predicted = proba.argmax(axis=1)
    present = np.unique(labels)
    if len(present) < 2:
        auc = float("nan")  # undefined with one class in the evaluated labels
    elif n_classes == 2:
        auc = roc_auc_score(labels, proba[:, 1])
    else:
        auc = roc_auc_score(labels, proba, multi_class="ovr", average="macro", labels=np.arange(n_classes))
    return {
        "acc": float(accuracy_score(labels, predicted)),
        "auc": float(auc),
        "f1_macro": float(f1_score(labels, predicted, average="macro", labels=np.arange(n_classes), zero_division=0)),
        "balanced_acc": float(balanced_accuracy_score(labels, predicted)),
    }


def aggregate(values) -> dict[str, float]:
    """Mean, sample standard deviation (ddof=1; 0 for one value) and n over seeds."""
    array = np.asarray(list(values), dtype=float)
    n = len(array)
    return {"mean": float(array.mean()) if n else float("nan"), "std": float(array.std(ddof=1)) if n > 1 else 0.0, "n": n}
