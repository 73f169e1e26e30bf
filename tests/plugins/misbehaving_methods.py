"""More methods that misbehave on purpose (``hica-bench -p misbehaving_methods``), for the fault-isolation
tests: each must fail only its own cells, with the reason in the results and the summary."""

import time

import numpy as np

from hica_bench import hookimpl
from hica_bench.interfaces import PluginSpec


class _Fitted:
    needs = frozenset({"image_features"})

    def fit(self, task):
        self.n_classes = task.n_classes
        return self


class WrongShape(_Fitted):
    """One probability column too many."""

    def predict_proba(self, features):
        return np.full((len(features), self.n_classes + 1), 1.0 / (self.n_classes + 1))


class Infs(_Fitted):
    def predict_proba(self, features):
        proba = np.full((len(features), self.n_classes), 1.0 / self.n_classes)
        proba[0, 0] = np.inf
        return proba


class Hangs(_Fitted):
    """Sleeps ``seconds`` in fit (a stuck method, for ``--cell-timeout``)."""

    def __init__(self, seconds=3600.0):
        self.seconds = seconds

    def fit(self, task):
        time.sleep(self.seconds)
        return super().fit(task)

    def predict_proba(self, features):
        return np.full((len(features), self.n_classes), 1.0 / self.n_classes)


@hookimpl
def hica_bench_methods():
    return [
        PluginSpec("method", "wrong-shape", "returns C + 1 probability columns (tests)", WrongShape),
        PluginSpec("method", "infs", "returns an infinite probability (tests)", Infs),
        PluginSpec("method", "hangs", "sleeps in fit (tests)", Hangs),
    ]
