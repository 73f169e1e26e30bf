"""Methods whose records are hard to write (``hica-bench -p result_hazards``), for the tests that a record the store
writes is always one it reads back: a ``fit_info_`` nested ``depth`` deep, and one that fails while it is recorded
(after the cell was scored)."""

import numpy as np

from hica_bench import hookimpl
from hica_bench.interfaces import Option, PluginSpec


class _Prior:
    needs = frozenset({"image_features"})

    def fit(self, task):
        self.prior_ = np.bincount(task.support_labels, minlength=task.n_classes) / len(task.support_labels)
        return self

    def predict_proba(self, features):
        return np.tile(self.prior_, (len(features), 1))


class DeepFitInfo(_Prior):
    def __init__(self, depth: int = 100_000):
        self.depth = depth

    def fit(self, task):
        super().fit(task)
        info = inner = {}
        for _ in range(self.depth):
            inner["next"] = {}
            inner = inner["next"]
        self.fit_info_ = info
        return self


class Unrecordable(dict):
    """A fit_info_ that raises while it is read for the record."""

    def items(self):
        raise RuntimeError("fit_info_ cannot be read")


class RaisingFitInfo(_Prior):
    def fit(self, task):
        super().fit(task)
        self.fit_info_ = Unrecordable(a=1)
        return self


@hookimpl
def hica_bench_methods():
    return [PluginSpec("method", "deep-fit-info", "fit_info_ nested depth deep (tests)", DeepFitInfo,
                       {"depth": Option(low=0)}),
            PluginSpec("method", "raising-fit-info", "fit_info_ that raises when recorded (tests)", RaisingFitInfo)]
