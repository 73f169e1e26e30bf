"""The report's statistics against known cases: identical methods, a constant shift, Demšar's (2006) worked example,
a hand-computed ECE and t-interval, and what cannot be computed."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st

from hica_bench import stats
from hica_bench.metrics import aggregate, calibration, classification_metrics, expected_calibration_error


def test_identical_methods_have_p_1_and_no_mark():
    values = {seed: 0.5 + 0.03 * seed for seed in range(10)}
    test = stats.paired_test(values, dict(values))
    stats.holm([test])
    assert test.p == 1.0 and test.p_holm == 1.0 and test.mark == "" and test.difference == 0.0


def test_a_constant_shift_over_ten_seeds_is_significant_after_holm():
    rng = np.random.default_rng(0)
    reference = {seed: float(v) for seed, v in enumerate(rng.uniform(0.4, 0.8, 10))}
    better = {seed: v + 0.04 for seed, v in reference.items()}
    worse = {seed: v - 0.04 for seed, v in reference.items()}
    noise = {seed: v + float(rng.normal(0, 0.05)) for seed, v in reference.items()}
    family = [stats.paired_test(m, reference) for m in (better, worse, noise)]
    stats.holm(family)
    up, down, unclear = family
    assert up.p == pytest.approx(2 / 2**10) and up.mark == "▲"  # the exact Wilcoxon p: all 10 signs agree
    assert down.mark == "▼" and down.p_holm == pytest.approx(3 * 2 / 2**10)  # Holm: the two smallest, x3 then max
    assert unclear.p > 0.05 and unclear.mark == ""


def test_what_cannot_be_computed_is_said_not_nan():
    one = stats.paired_test({0: 0.7}, {0: 0.6})
    assert one.p is None and one.note == "n = 1, not computed" and one.mark == ""
    none = stats.paired_test({0: 0.7, 1: 0.6}, {2: 0.6})
    assert none.p is None and none.n == 0 and none.note == "no seeds in common, not computed"
    few = stats.paired_test({0: 0.7, 1: 0.8, 2: 0.9}, {0: 0.6, 1: 0.7, 2: 0.8})
    assert few.p == pytest.approx(0.25) and "fewer than 6 seeds" in few.note
    assert stats.t_interval([0.7]) is None and stats.t_interval([float("nan"), 0.5]) is None
    stats.holm([one, none])  # nothing to correct: no error
    assert one.p_holm is None


def test_t_interval_by_hand():
    interval = stats.t_interval([0.5, 0.6, 0.7])
    se = 0.1 / math.sqrt(3)
    assert interval.mean == pytest.approx(0.6) and interval.se == pytest.approx(se)
    assert interval.half_width == pytest.approx(4.302652729911275 * se)  # t(0.975, 2)
    assert aggregate([0.5, 0.6, 0.7, float("nan")])["ci_high"] == pytest.approx(interval.high)
    flat = stats.t_interval([0.5, 0.5])
    assert (flat.low, flat.high, flat.se) == (0.5, 0.5, 0.0)


#: Demšar (2006), JMLR 7, Table 6: the ranks of four C4.5 variants (C4.5, C4.5+m, C4.5+cf, C4.5+m+cf) by AUC on
#: 14 data sets (1 = best); average ranks 3.143, 2.000, 2.893, 1.964; Friedman chi-square 9.28; with k = 4 and
#: N = 14, q_0.05 = 2.569 and the Nemenyi critical difference CD = 1.25 (section 3.2.4).
DEMSAR_RANKS = [
    (4, 3, 2, 1), (1, 2, 3, 4), (4, 1, 2, 3), (4, 1, 3, 2), (4, 2, 3, 1), (1, 2.5, 4, 2.5), (3, 2, 4, 1),
    (2.5, 2.5, 4, 1), (4, 3, 2, 1), (2.5, 2.5, 2.5, 2.5), (4, 2.5, 1, 2.5), (3, 2, 4, 1), (4, 1, 2, 3), (3, 1, 4, 2),
]


def test_friedman_and_the_critical_difference_reproduce_demsar_2006():
    table = pd.DataFrame(DEMSAR_RANKS, columns=["C4.5", "C4.5+m", "C4.5+cf", "C4.5+m+cf"])
    result = stats.friedman(table, higher_is_better=False)  # the table holds ranks: lower is better
    assert [round(result.average_ranks[m], 3) for m in table.columns] == [3.143, 2.0, 2.893, 1.964]
    k, n = 4, 14
    uncorrected = 12 * n / (k * (k + 1)) * (sum(r**2 for r in result.average_ranks.values()) - k * (k + 1) ** 2 / 4)
    assert round(uncorrected, 2) == 9.28  # the paper's statistic, from the average ranks
    assert result.statistic >= uncorrected and result.p < 0.05  # scipy corrects for the tied ranks: a little larger
    assert round(result.q_alpha, 3) == 2.569 and round(result.cd, 2) == 1.25
    for a in table.columns:  # Nemenyi's pairwise p-values and the CD agree on every pair
        for b in table.columns:
            if a != b:
                apart = abs(result.average_ranks[a] - result.average_ranks[b]) > result.cd
                assert apart == (result.nemenyi.loc[a, b] < 0.05), (a, b)


def test_friedman_with_too_few_methods_is_not_computed():
    result = stats.friedman(pd.DataFrame({"a": [0.5, 0.6], "b": [0.4, 0.7]}))
    assert result.p is None and result.cd is None and "not computed" in result.note


def test_ece_by_hand():
    proba = np.array([[0.93, 0.07], [0.22, 0.78], [0.31, 0.69], [0.45, 0.55], [0.08, 0.92]])
    labels = np.array([0, 0, 1, 0, 1])
    # confidences 0.93 right, 0.78 wrong, 0.69 right, 0.55 wrong, 0.92 right; 15 bins of width 1/15:
    # (0.8667, 0.9333] holds 0.93 and 0.92 (accuracy 1, confidence 0.925); the others are alone in their bins
    expected = (2 * abs(1 - 0.925) + abs(0 - 0.78) + abs(1 - 0.69) + abs(0 - 0.55)) / 5
    diagram = calibration(labels, proba)
    assert sum(diagram.count) == 5 and diagram.count[13] == 2 and diagram.accuracy[13] == 1.0
    assert expected_calibration_error(diagram) == pytest.approx(expected)
    assert classification_metrics(labels, proba).ece == pytest.approx(expected)
    perfect = np.eye(2)[labels]
    assert classification_metrics(labels, perfect).ece == pytest.approx(0.0)


def test_bootstrap_interval_holds_the_observed_accuracy():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    proba = np.where(rng.random(200) < 0.8, np.eye(2)[labels].T, np.eye(2)[1 - labels].T).T * 0.8 + 0.1
    accuracy = float((proba.argmax(1) == labels).mean())
    low, high = stats.bootstrap_interval(labels, proba, lambda y, p: float((p.argmax(1) == y).mean()), 500)
    assert low < accuracy < high and 0.05 < high - low < 0.2  # about ±1.96·√(0.8·0.2/200) ≈ ±0.055


def test_a_table_too_large_for_holm_is_said_so():
    reference = {seed: 0.5 + 0.01 * seed for seed in range(10)}
    # distinct differences (no ties: scipy's exact distribution, not its slower permutation path for ties)
    family = [stats.paired_test({s: v + 0.05 + 1e-4 * s for s, v in reference.items()}, reference) for _ in range(30)]
    stats.holm(family)
    assert all(t.mark == "" for t in family)  # 30 x 2/1024 > 0.05: no mark possible
    assert "30 tests in this table and 10 seeds" in stats.holm_reachable(family)
    assert stats.holm_reachable(family[:20]) is None  # 20 x 2/1024 < 0.05: a mark is possible


def test_friedman_of_ties_in_every_block_is_not_computed_and_warns_nothing():
    import warnings

    table = pd.DataFrame({"a": [0.5, 0.7], "b": [0.5, 0.7], "c": [0.5, 0.7]}, index=["d1 k=1", "d2 k=1"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy's 0/0 would be a RuntimeWarning on stderr of every run and report
        result = stats.friedman(table)
    assert result.p is None and result.note == "every method tied in every block, not computed"


def test_differences_equal_in_size_tie_as_exact_counts_do():
    """Per-seed AUC differences of ±4/4788 and ±12/4788 computed from floats come out a few bits apart; the test must
    rank them as the ties they are: its p is scipy's tie-aware p on the exact counts (hand-checkable: the signed
    ranks of counts 4, -4, 4, 4, 12, -12, 4, 4, 12, 4)."""
    from scipy import stats as scipy_stats

    counts = np.array([4, -4, 4, 4, 12, -12, 4, 4, 12, 4])
    reference = {seed: 0.61 + 0.0173 * seed for seed in range(10)}
    method = {seed: reference[seed] + counts[seed] / 4788 for seed in range(10)}
    raw = np.array([method[s] - reference[s] for s in range(10)])
    assert len(set(np.abs(raw).tolist())) > 2  # floating point broke the ties
    expected = scipy_stats.wilcoxon(counts, zero_method="zsplit", alternative="two-sided").pvalue
    assert stats.paired_test(method, reference).p == pytest.approx(expected, abs=1e-12)
    assert scipy_stats.wilcoxon(raw, zero_method="zsplit").pvalue != pytest.approx(expected, abs=1e-6)


def _same_p_as_scipy(counts, unit: float) -> None:
    from scipy import stats as scipy_stats

    diffs = np.round(np.array(counts, float) * unit, stats.DIFF_DECIMALS)
    if diffs.any():  # else paired_test answers "identical on every seed" before any test
        expected = scipy_stats.wilcoxon(diffs, zero_method="zsplit", alternative="two-sided").pvalue
        assert stats.wilcoxon_p(diffs) == float(expected), diffs


# scipy's own p costs up to 2^n statistic calls (0.2 s at n = 10): few examples, up to 10 differences
@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(-6, 6), min_size=1, max_size=10), st.sampled_from([1.0, 1 / 156, 1 / 4788, 0.25]))
def test_the_paired_p_is_scipys_wilcoxon_p_exactly(counts, unit):
    """wilcoxon_p (scipy's permutation test with the statistic vectorised) gives scipy.stats.wilcoxon's own p, to the
    bit, on differences with ties and zeros (counts of a test split's images: the usual case) and without them."""
    _same_p_as_scipy(counts, unit)


@pytest.mark.parametrize("counts", [[3, -1, 0, 2, 2, -5, 1, 4, 0, 3, -2, 6, 1],  # 13 with ties and zeros: permuted
                                    [3, -1, 0, 2, 2, -5, 1, 4, 0, 3, -2, 6, 1, 7],  # 14: scipy's normal approximation
                                    [1, -2, 3, 4, -5, 6, 7, 8, -9, 10, 11, 12]])  # no ties, no zeros: scipy's exact
def test_the_paired_p_is_scipys_at_its_switches(counts):
    _same_p_as_scipy(counts, 1 / 156)


def test_a_nan_difference_gives_scipys_nan_not_a_p():
    """A NaN among tied differences (inf - inf) is scipy's NaN, never a p computed past it."""
    assert math.isnan(stats.wilcoxon_p(np.array([np.nan, 0.1, 0.1, 0.0])))
    assert math.isnan(stats.wilcoxon_p(np.array([np.nan, np.nan, 0.2])))


def test_few_blocks_get_the_exact_permutation_p_not_chi_squares():
    """3 methods ranked the same in 2 blocks: Friedman's statistic is its largest, 4 (rank sums 2, 4, 6: 12 / (2·3·4) ·
    56 − 3·2·4), chi-square's p exp(−2) = 0.135; by permuting the methods within each block (3!² = 36 arrangements),
    the 6 in which block 2 orders them as block 1 reach it: exact p = 1/6."""
    table = pd.DataFrame({"a": [0.9, 0.8], "b": [0.7, 0.6], "c": [0.5, 0.4]}, index=["breastmnist", "pneumoniamnist"])
    result = stats.friedman(table)
    assert result.statistic == pytest.approx(4.0) and result.p_chi_square == pytest.approx(math.exp(-2))
    assert result.p_method == "exact permutation" and result.p == pytest.approx(1 / 6)
    many = pd.DataFrame(np.random.default_rng(0).random((12, 3)), columns=list("abc"))
    assert stats.friedman(many).p_method == "chi-square"  # enough blocks for the approximation


def test_the_cd_diagram_axis_runs_from_rank_1(tmp_path):
    from hica_bench import report

    table = pd.DataFrame({"a": [0.9, 0.8, 0.85], "b": [0.7, 0.75, 0.6], "c": [0.5, 0.4, 0.55], "d": [0.3, 0.2, 0.1]},
                         index=["breastmnist", "pneumoniamnist", "retinamnist"])
    result = stats.friedman(table)
    assert result.blocks == ["breastmnist", "pneumoniamnist", "retinamnist"] and result.p_method == "exact permutation"
    import matplotlib.pyplot as plt

    shown = []
    original = plt.Figure.savefig
    plt.Figure.savefig = lambda figure, *a, **k: (shown.append(figure.axes[0].get_xlim()), original(figure, *a, **k))[1]
    try:
        name = report.cd_diagram(result, "test", tmp_path, svg=False)
    finally:
        plt.Figure.savefig = original
    assert name.startswith("data:image/png") and (tmp_path / "cd-test.png").is_file()
    assert shown[0] == pytest.approx((0.95, 4.05))
