"""Plugins that break the contract on purpose (``hica-bench -p hostile_plugins``), for the hostile-input tests: each
must spoil only its own cells (or, for a spec that cannot be used, only itself), never the run or the listing."""

import sys

import numpy as np

from hica_bench import hookimpl
from hica_bench.interfaces import PluginSpec


class _Prior:
    needs = frozenset({"image_features"})

    def fit(self, task):
        self.prior_ = np.bincount(task.support_labels, minlength=task.n_classes) / len(task.support_labels)
        return self

    def predict_proba(self, features):
        return np.tile(self.prior_, (len(features), 1))


def _constructor_raising(error: BaseException):
    class Raises(_Prior):
        def __init__(self):
            raise error

    return Raises


class ExitsInFit(_Prior):
    def __init__(self, code: int = 3):
        self.code = code

    def fit(self, task):
        sys.exit(self.code)


class OddFitInfo(_Prior):
    """Records what it chose as numpy numbers, an array, an object, a key that is not text and itself: not JSON as it
    stands. ``extra`` (set by a test) is added as it is."""

    extra: dict = {}

    def fit(self, task):
        super().fit(task)
        self.fit_info_ = {"prior": self.prior_, "n": np.int64(len(task.support_labels)), "model": object(),
                          np.int64(1): "a numpy key", (0, 1): "a tuple key", **self.extra}
        self.fit_info_["itself"] = self.fit_info_
        return self


@hookimpl
def hica_bench_methods():
    return [
        PluginSpec("method", "ctor-runtime-error", "constructor raises RuntimeError (tests)", _constructor_raising(RuntimeError("boom"))),
        PluginSpec("method", "ctor-value-error", "constructor raises ValueError (tests)", _constructor_raising(ValueError("bad"))),
        PluginSpec("method", "ctor-key-error", "constructor raises KeyError (tests)", _constructor_raising(KeyError("missing"))),
        PluginSpec("method", "ctor-exits", "constructor calls sys.exit (tests)", _constructor_raising(SystemExit(4))),
        PluginSpec("method", "exits-in-fit", "calls sys.exit in fit (tests)", ExitsInFit),
        PluginSpec("method", "odd-fit-info", "fit_info_ of numpy values and an object (tests)", OddFitInfo),
    ]
