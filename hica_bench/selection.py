"""The selection rule of the selecting protocols (``few-shot-val``, ``support-cv``, ``oracle``), written once for every
method: which candidates a method's search space gives, the folds of cross-validation on a support set, and how a
candidate is scored. :func:`hica_bench.cell.fit_and_score` runs the search; nothing here fits a model.

- **Candidates** (:func:`candidates`): every combination of the values the method's spec declares in ``search``
  (:attr:`hica_bench.interfaces.PluginSpec.search`), in the declared order. An option the user set on the command line
  (``linear-probe:C=1``) is fixed: it is not searched.
- **Score** (:func:`score`): the chosen metric (balanced accuracy by default) of the candidate's probabilities on the
  validation images (or the held-out folds, or the test split for the oracle), averaged over folds.
- **Choice**: the candidate with the highest score; ties go to the first in the declared order, so the choice is
  deterministic (specs list first the value a tie should keep: the default, or a neutral one). The chosen candidate is then fitted again on the whole support, seeded as every fit of the cell, and
  only it predicts the test split.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import numpy as np

from hica_bench.metrics import classification_metrics
from hica_bench.registry import Choice

#: Folds of support-set cross-validation: min(k, MAX_FOLDS), stratified, shuffled by the cell's seed.
MAX_FOLDS = 5


def searched(method: Choice) -> dict[str, tuple]:
    """The options of ``method`` its search covers: those its spec declares a search space for and the user left at
    their defaults."""
    spec = method.registered.spec
    defaults = spec.options
    return {name: tuple(values) for name, values in spec.search.items() if method.options.get(name) == defaults[name]}


def candidates(method: Choice) -> list[Choice]:
    """``method`` with each combination of its searched values (:func:`searched`), in the declared order; ``[method]``
    when it searches nothing."""
    space = searched(method)
    if not space:
        return [method]
    names = list(space)
    return [dataclasses.replace(method, options={**method.options, **dict(zip(names, values))})
            for values in itertools.product(*(space[name] for name in names))]


def folds(support_labels: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fit, held out) positions into the support set: stratified, min(k, :data:`MAX_FOLDS`) folds, shuffled by
    ``seed`` (scikit-learn's ``StratifiedKFold``). Needs k >= 2."""
    from sklearn.model_selection import StratifiedKFold

    splitter = StratifiedKFold(n_splits=min(k, MAX_FOLDS), shuffle=True, random_state=seed % 2**32)
    return [(np.sort(fit), np.sort(held)) for fit, held in splitter.split(np.zeros(len(support_labels)), support_labels)]


def score(labels: np.ndarray, proba: np.ndarray, metric: str) -> float:
    """``metric`` (``balanced_acc``, ``acc`` or ``auc``) of ``proba`` against ``labels``."""
    return float(getattr(classification_metrics(labels, proba.astype(np.float64)), metric))


def record(names: list[str], tried: list[Choice], scores: list[float], chosen: int, **about: Any) -> dict[str, Any]:
    """What a cell's ``fit_info["selection"]`` holds: ``about`` (the protocol, rule, metric, what was scored, the fits),
    each candidate tried (its values of the searched options ``names``) with its score, and the choice."""
    return {**about, "candidates": [{"options": {name: c.options[name] for name in names}, "score": s}
                                    for c, s in zip(tried, scores)],
            "chosen": {name: tried[chosen].options[name] for name in names}}
