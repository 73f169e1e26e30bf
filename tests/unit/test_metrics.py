import numpy as np
import pytest
from medmnist.evaluator import getACC, getAUC

from hica_bench.metrics import aggregate, classification_metrics


def test_binary_matches_medmnist_evaluator():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    p1 = np.clip(labels * 0.3 + rng.random(200) * 0.7, 0, 1)
    proba = np.stack([1 - p1, p1], axis=1)
    ours = classification_metrics(labels, proba)
    assert np.isclose(ours.auc, getAUC(labels, proba, "binary-class"))
    assert np.isclose(ours.acc, getACC(labels, proba, "binary-class"))


def test_multiclass_matches_medmnist_evaluator():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 300)
    logits = rng.normal(size=(300, 4)) + 1.5 * np.eye(4)[labels]
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ours = classification_metrics(labels, proba)
    assert np.isclose(ours.auc, getAUC(labels, proba, "multi-class"))
    assert np.isclose(ours.acc, getACC(labels, proba, "multi-class"))
    assert 0 < ours.f1_macro <= 1 and 0 < ours.balanced_acc <= 1


def test_aggregate_uses_sample_std():
    two = aggregate([0.5, 0.7])
    assert (two["mean"], two["std"], two["n"]) == (0.6, np.std([0.5, 0.7], ddof=1), 2)
    assert two["se"] == pytest.approx(0.1) and two["ci_high"] - two["ci_low"] == pytest.approx(2 * 12.706204736 * 0.1)
    assert aggregate([0.5]) == {"mean": 0.5, "std": 0.0, "n": 1, "se": None, "ci_low": None, "ci_high": None}
    assert aggregate([0.5, float("nan"), 0.7])["n"] == 2  # an undefined AUC of one seed is left out, not averaged in


def test_metric_names_live_in_one_place():
    from hica_bench import check, leaderboard
    from hica_bench.metrics import HEADLINE, METRICS
    from hica_bench.results import Metrics

    assert METRICS == Metrics.names() == ("acc", "auc", "f1_macro", "balanced_acc", "ece")
    assert check.HEADLINE is HEADLINE and set(HEADLINE) <= set(METRICS)
    assert leaderboard.HEADLINE is HEADLINE
