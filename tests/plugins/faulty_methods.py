"""Methods that misbehave on purpose, for the fault-isolation tests (``hica-bench -p faulty_methods``)."""

import numpy as np

from hica_bench import hookimpl
from hica_bench.interfaces import PluginSpec


class Raises:
    needs = frozenset({"image_features"})

    def fit(self, task):
        raise RuntimeError("deliberate failure in fit")

    def predict_proba(self, features):  # pragma: no cover - never reached
        raise AssertionError


class NaNs:
    needs = frozenset({"image_features"})

    def fit(self, task):
        self.n_classes = task.n_classes
        return self

    def predict_proba(self, features):
        return np.full((len(features), self.n_classes), np.nan)


class Brackets(Raises):
    def fit(self, task):
        raise ValueError("option [lr] of [stage 2] is out of range [0, 1]")


@hookimpl
def hica_bench_methods():
    return [
        PluginSpec("method", "raises", "always raises in fit (tests)", Raises),
        PluginSpec("method", "nans", "returns NaN probabilities (tests)", NaNs),
        PluginSpec("method", "brackets", "raises with [square brackets] in its message (tests)", Brackets),
    ]
