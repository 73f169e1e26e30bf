"""A method that tells which features it predicts on (``hica-bench -p spy_methods``), and :class:`Tripwire`: test
features that fail on any access but the one a method makes in ``predict_proba``. Together they show that a selecting
protocol reads the test split only for the final prediction (the oracle excepted)."""

import numpy as np

from hica_bench import hookimpl
from hica_bench.interfaces import PluginSpec


class Tripwire:
    """Stands for a test split's features: any read but :meth:`open` (what :class:`Spy` calls in ``predict_proba``)
    raises, so nothing reads the test split outside a prediction."""

    def __init__(self, features: np.ndarray) -> None:
        self._features = features
        self.opened = 0

    def open(self) -> np.ndarray:
        self.opened += 1
        return self._features

    def _tripped(self, *args, **kwargs):
        raise AssertionError("the test split was read outside a prediction")

    __array__ = __len__ = __getitem__ = __iter__ = _tripped

    def __getattr__(self, name):
        raise AssertionError(f"the test split was read outside a prediction (.{name})")


class Spy:
    """Nearest class mean with a temperature ``sharpness`` (searched); predicts on a Tripwire only by opening it."""

    needs = frozenset({"image_features"})

    def __init__(self, sharpness: float = 1.0) -> None:
        self.sharpness = sharpness

    def fit(self, task):
        features = np.asarray(task.support_features, dtype=np.float64)
        self.means_ = np.stack([features[task.support_labels == c].mean(0) for c in range(task.n_classes)])
        return self

    def predict_proba(self, features):
        values = features.open() if isinstance(features, Tripwire) else np.asarray(features)
        distance = ((np.asarray(values, dtype=np.float64)[:, None, :] - self.means_[None]) ** 2).sum(-1)
        logits = -self.sharpness * distance / max(distance.mean(), 1e-12)
        logits -= logits.max(1, keepdims=True)
        proba = np.exp(logits)
        return proba / proba.sum(1, keepdims=True)


@hookimpl
def hica_bench_methods():
    return [PluginSpec("method", "spy", "nearest mean that opens the test features only to predict (tests)", Spy,
                       search={"sharpness": (1.0, 0.1, 10.0)})]
