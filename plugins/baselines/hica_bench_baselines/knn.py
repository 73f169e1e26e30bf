"""k-nearest neighbours on frozen image features (any encoder pair)."""

from __future__ import annotations

import math

import numpy as np

from hica_bench.interfaces import FewShotTask, Option, PluginSpec
from hica_bench_baselines.common import POSITIVE, l2_normalise


def auto_neighbours(k: int, n_support: int) -> int:
    """The largest odd number <= sqrt(support size), at most k (never more neighbours than shots per class):
    1 neighbour at 1 shot; at 2 classes 3 at 5 shots and 5 at 20 shots."""
    n = max(1, math.isqrt(n_support))
    n -= 1 - n % 2  # odd: no ties between two classes
    return max(1, min(n, k))


class KNN:
    """Cosine kNN (scikit-learn, brute force) on L2-normalised features. Votes are weighted by
    ``exp(cosine / temperature)`` (DINO's weighted kNN, temperature 0.07), so probabilities are graded.
    ``neighbours=0`` picks the count with :func:`auto_neighbours`; no validation is used."""

    needs = frozenset({"image_features"})

    def __init__(self, neighbours: int = 0, temperature: float = 0.07) -> None:
        self.neighbours, self.temperature = neighbours, temperature

    def _weights(self, distances: np.ndarray) -> np.ndarray:
        return np.exp(-distances / self.temperature)  # cosine distance = 1 - cosine; the constant cancels

    def fit(self, task: FewShotTask) -> "KNN":
        from sklearn.neighbors import KNeighborsClassifier

        n_support = len(task.support_labels)
        self.neighbours_ = min(self.neighbours, n_support) if self.neighbours > 0 else auto_neighbours(task.k, n_support)
        self.model_ = KNeighborsClassifier(n_neighbors=self.neighbours_, metric="cosine", algorithm="brute",
                                           weights=self._weights)
        self.model_.fit(l2_normalise(task.support_features), task.support_labels)
        self.n_classes_ = task.n_classes
        self.fit_info_ = {"neighbours": int(self.neighbours_)}
        return self

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        proba = np.zeros((len(features), self.n_classes_))
        proba[:, self.model_.classes_] = self.model_.predict_proba(l2_normalise(features))
        return proba


SPECS = [
    PluginSpec("method", "knn", "Cosine kNN on frozen features, exp(cos/temperature)-weighted votes; neighbours=0: "
               "largest odd <= sqrt(support size), at most k", KNN, {"neighbours": Option(low=0), "temperature": POSITIVE},
               in_default_suite=True, search={"neighbours": (0, 1, 3, 5, 7)}),
]
