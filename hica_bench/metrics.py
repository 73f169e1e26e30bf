"""Classification metrics (scikit-learn) following medmnist's Evaluator convention, and seed aggregation.

ACC is argmax accuracy. AUC: binary tasks use the positive-class probability; multi-class tasks the
one-vs-rest macro AUC. Also macro-F1, balanced accuracy and the expected calibration error (ECE, :func:`calibration`).
Values are fractions in [0, 1]. scikit-learn is imported by the functions that use it (about a second), so a run
that stops on bad input, or whose cells are all finished, does not pay for it.
The names live in one place: :class:`hica_bench.results.Metrics`; :data:`HEADLINE` are those the tables and the
regression gate show.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np

from hica_bench.results import Calibration, Metrics, MultiLabelScore, PerClass
from hica_bench.startup import collection_paused

METRICS = Metrics.names()  #: every metric a result records
HEADLINE = ("acc", "auc")  #: the ones leaderboards and ``hica-bench check`` compare


def _sklearn_metrics():
    """``sklearn.metrics``, imported (the first time) with the collector paused (hica_bench.startup)."""
    with collection_paused():
        import sklearn.metrics

    return sklearn.metrics


def classification_metrics(labels: np.ndarray, proba: np.ndarray, diagram: Calibration | None = None) -> Metrics:
    """The metrics of ``proba`` against ``labels``; ``diagram``: their :func:`calibration`, when already computed."""
    sk = _sklearn_metrics()

    n_classes = proba.shape[1]
    predicted = proba.argmax(axis=1)
    present = np.unique(labels)
    if len(present) < 2:
        auc = float("nan")  # undefined with one class in the evaluated labels
    elif n_classes == 2:
        auc = sk.roc_auc_score(labels, proba[:, 1])
    else:
        auc = sk.roc_auc_score(labels, proba, multi_class="ovr", average="macro", labels=np.arange(n_classes))
    return Metrics(
        acc=float(sk.accuracy_score(labels, predicted)),
        auc=float(auc),
        f1_macro=float(sk.f1_score(labels, predicted, average="macro", labels=np.arange(n_classes), zero_division=0)),
        balanced_acc=float(sk.balanced_accuracy_score(labels, predicted)),
        ece=expected_calibration_error(diagram if diagram is not None else calibration(labels, proba)),
    )


def multilabel_metrics(labels: np.ndarray, scores: np.ndarray, names: list[str]) -> tuple[Metrics, MultiLabelScore]:
    """A multi-label cell's scores: ``labels`` (N, L) in {0, 1}, ``scores`` (N, L) each label's one-vs-rest probability.
    Per label its AUC and average precision (scikit-learn; None where the test images hold one outcome only); the
    :class:`Metrics` hold their means over the labels (``auc``: mean AUC, as ChestMNIST's Evaluator; ``acc`` and
    ``balanced_acc``: the per-label accuracies at the 0.5 threshold, averaged; ``f1_macro``: scikit-learn's macro F1
    over labels; no ECE), the :class:`MultiLabelScore` the per-label values and mean AP."""
    sk = _sklearn_metrics()

    labels = np.asarray(labels).astype(np.int64)
    predicted = (scores >= 0.5).astype(np.int64)
    auc, ap, accs, balanced = [], [], [], []
    for j in range(labels.shape[1]):
        both = len(np.unique(labels[:, j])) == 2
        auc.append(float(sk.roc_auc_score(labels[:, j], scores[:, j])) if both else None)
        ap.append(float(sk.average_precision_score(labels[:, j], scores[:, j])) if both else None)
        accs.append(float(sk.accuracy_score(labels[:, j], predicted[:, j])))
        balanced.append(float(sk.balanced_accuracy_score(labels[:, j], predicted[:, j])) if both else accs[-1])
    mean = lambda values: float(np.mean([v for v in values if v is not None])) if any(v is not None for v in values) else float("nan")  # noqa: E731
    metrics = Metrics(acc=float(np.mean(accs)), auc=mean(auc),
                      f1_macro=float(sk.f1_score(labels, predicted, average="macro", zero_division=0)),
                      balanced_acc=float(np.mean(balanced)), ece=None)
    return metrics, MultiLabelScore(list(names), auc, ap, [int(v) for v in labels.sum(axis=0)], mean(auc), mean(ap))


ECE_BINS = 15  #: Guo et al. (2017), "On Calibration of Modern Neural Networks", section 2


def calibration(labels: np.ndarray, proba: np.ndarray, bins: int = ECE_BINS) -> Calibration:
    """The reliability diagram of Guo et al. (2017): confidence = the predicted class's probability, binned into
    ``bins`` equal-width intervals ((0, 1/B], (1/B, 2/B], ...; a confidence of exactly 0 goes to the first); per bin the
    count, mean confidence and accuracy. Written here because neither scikit-learn (``calibration_curve`` is
    binary and drops the counts) nor scipy computes the multi-class top-label version."""
    confidence = proba.max(axis=1).astype(np.float64)
    correct = (proba.argmax(axis=1) == labels).astype(np.float64)
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    count = np.bincount(index, minlength=bins)
    conf_sum = np.bincount(index, weights=confidence, minlength=bins)
    acc_sum = np.bincount(index, weights=correct, minlength=bins)
    mean = lambda total: [float(t / c) if c else None for t, c in zip(total, count)]  # noqa: E731
    return Calibration([int(c) for c in count], mean(conf_sum), mean(acc_sum))


def expected_calibration_error(diagram: Calibration) -> float:
    """ECE = sum over bins of (n_bin / n) * |accuracy_bin - confidence_bin| (Guo et al. 2017, eq. 3)."""
    n = sum(diagram.count)
    return float(sum(c / n * abs(a - f) for c, a, f in zip(diagram.count, diagram.accuracy, diagram.confidence) if c))


def per_class(labels: np.ndarray, proba: np.ndarray) -> PerClass:
    """Recall and precision of each class (0 where a class is never predicted or never present) and the confusion
    matrix, rows = true class, columns = predicted class (scikit-learn)."""
    sk = _sklearn_metrics()

    classes = np.arange(proba.shape[1])
    predicted = proba.argmax(axis=1)
    precision, recall, _, _ = sk.precision_recall_fscore_support(labels, predicted, labels=classes, zero_division=0)
    confusion = sk.confusion_matrix(labels, predicted, labels=classes)
    return PerClass([float(v) for v in recall], [float(v) for v in precision], confusion.astype(int).tolist())


def aggregate(values: Iterable[float]) -> dict[str, float | None]:
    """Mean, sample standard deviation (ddof=1; 0 for one value), n, and the standard error and 95 % t-interval of
    the mean (:func:`hica_bench.stats.t_interval`; None for one value) over seeds; NaN values (e.g. an AUC that is
    undefined for a seed) are left out. The one seed aggregation of the leaderboards, the report and the gate."""
    from hica_bench.stats import t_interval

    values = list(values)
    array = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    n = len(array)
    interval = t_interval(array)
    return {"mean": float(array.mean()) if n else float("nan"), "std": float(array.std(ddof=1)) if n > 1 else 0.0, "n": n,
            "se": None if interval is None else interval.se, "ci_low": None if interval is None else interval.low,
            "ci_high": None if interval is None else interval.high}
