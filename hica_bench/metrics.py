"""Classification metrics (scikit-learn) following medmnist's Evaluator convention, and seed aggregation.

ACC is argmax accuracy. AUC: binary tasks use the positive-class probability; multi-class tasks the
one-vs-rest macro AUC. Also macro-F1 and balanced accuracy. Values are fractions in [0, 1].
The names live in one place: :class:`hica_bench.results.Metrics`; :data:`HEADLINE` are those the tables and the
regression gate show.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score,
                             precision_recall_fscore_support, roc_auc_score)

from hica_bench.results import Metrics, PerClass

METRICS = Metrics.names()  #: every metric a result records
HEADLINE = ("acc", "auc")  #: the ones leaderboards and ``hica-bench check`` compare


def classification_metrics(labels: np.ndarray, proba: np.ndarray) -> Metrics:
    n_classes = proba.shape[1]
    predicted = proba.argmax(axis=1)
    present = np.unique(labels)
    if len(present) < 2:
        auc = float("nan")  # undefined with one class in the evaluated labels
    elif n_classes == 2:
        auc = roc_auc_score(labels, proba[:, 1])
    else:
        auc = roc_auc_score(labels, proba, multi_class="ovr", average="macro", labels=np.arange(n_classes))
    return Metrics(
        acc=float(accuracy_score(labels, predicted)),
        auc=float(auc),
        f1_macro=float(f1_score(labels, predicted, average="macro", labels=np.arange(n_classes), zero_division=0)),
        balanced_acc=float(balanced_accuracy_score(labels, predicted)),
    )


def per_class(labels: np.ndarray, proba: np.ndarray) -> PerClass:
    """Recall and precision of each class (0 where a class is never predicted or never present) and the confusion
    matrix, rows = true class, columns = predicted class (scikit-learn)."""
    classes = np.arange(proba.shape[1])
    predicted = proba.argmax(axis=1)
    precision, recall, _, _ = precision_recall_fscore_support(labels, predicted, labels=classes, zero_division=0)
    confusion = confusion_matrix(labels, predicted, labels=classes)
    return PerClass([float(v) for v in recall], [float(v) for v in precision], confusion.astype(int).tolist())


def aggregate(values: Iterable[float]) -> dict[str, float]:
    """Mean, sample standard deviation (ddof=1; 0 for one value) and n over seeds; NaN values (e.g. an AUC that is
    undefined for a seed) are left out. The one seed aggregation of the leaderboards and the regression gate."""
    array = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    n = len(array)
    return {"mean": float(array.mean()) if n else float("nan"), "std": float(array.std(ddof=1)) if n > 1 else 0.0, "n": n}
