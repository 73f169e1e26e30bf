"""Statistics of results: intervals over seeds, paired tests against a reference method, Holm's correction, the
Friedman test with Nemenyi's critical difference (Demšar 2006), and a test-set bootstrap.

Every test and interval comes from scipy.stats, statsmodels or scikit-posthocs; this module only picks, pairs and
labels. What cannot be computed (one seed, no seeds in common) is said in words, never a NaN.

- **Interval** of a cell (a method at one k): the two-sided 95 % Student-t interval of the mean over seeds,
  ``mean ± t(0.975, n-1) · s / √n`` (``scipy.stats.t.interval``); with one seed: not computed.
- **Paired test** against the reference method (default ``linear-probe``) at the same (dataset, encoder, k): over the
  seeds both have, whose support sets are the same images (the sampling depends only on the dataset, k and seed), the
  Wilcoxon signed-rank test on the per-seed differences (``scipy.stats.wilcoxon``, two-sided, zero differences split
  between the signs, exact where scipy can be). Chosen over the paired t-test because per-seed accuracy differences at
  1-5 shots are far from normal (a few support sets fail badly); with fewer than 6 seeds it cannot reach p < 0.05 and
  the report says so. All differences zero: p = 1. The differences are rounded to :data:`DIFF_DECIMALS` decimals
  first: metrics are ratios of counts, so differences equal in size (±4/4788) must tie in the ranking, which floating
  point would break by a few bits (scipy then ranks them as distinct and misses its tie correction).
- **Holm's correction** (``statsmodels.stats.multitest.multipletests``) over every paired test of one table (one
  dataset, encoder and metric: every method and k); a mark needs the corrected p < 0.05.
- **Across datasets**: blocks are the datasets (each method's mean over seeds at each k, averaged over the shots),
  which are independent (blocks of one dataset at several k are not); treatments the methods with a mean in every
  block; average ranks (rank 1 = best), the Friedman test (``scipy.stats.friedmanchisquare``; with fewer than
  :data:`FEW_BLOCKS` blocks, where its chi-square approximation is poor, its p-value by permuting the methods' values
  within each block: exact when there are at most :data:`EXACT_PERMUTATIONS` arrangements, else
  :data:`PERMUTATIONS` random ones, ``scipy.stats.permutation_test``), Nemenyi's critical difference
  ``CD = q_α · √(k(k+1) / 6N)`` with ``q_α`` the studentized range quantile over √2 (``scipy.stats.studentized_range``),
  and Nemenyi's pairwise p-values (``scikit_posthocs.posthoc_nemenyi_friedman``) for the diagram's bars.
- **Bootstrap** (``--bootstrap N``): per seed, a percentile interval of the metric over N resamples of the test images
  (``scipy.stats.bootstrap``, paired over labels and probabilities), from the saved predictions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

CONFIDENCE = 0.95
ALPHA = 0.05
TEST = "Wilcoxon signed-rank (two-sided, zeros split), Holm-corrected per table"


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    se: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def finite(values) -> np.ndarray:
    return np.asarray([v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))], float)


def t_interval(values, confidence: float = CONFIDENCE) -> Interval | None:
    """The Student-t interval of the mean of ``values`` (NaN and None left out); None with fewer than two."""
    array = finite(values)
    n = len(array)
    if n < 2:
        return None
    from scipy import stats

    mean, se = float(array.mean()), float(stats.sem(array))
    if se == 0:
        return Interval(mean, mean, mean, 0.0, n)
    low, high = stats.t.interval(confidence, n - 1, loc=mean, scale=se)
    return Interval(mean, float(low), float(high), se, n)


@dataclass
class Paired:
    """One paired comparison of a method with the reference at one (dataset, encoder, k, metric)."""

    n: int  #: seeds in common
    difference: float | None  #: mean of (method - reference) over those seeds
    p: float | None  #: None: not computed (``note`` says why)
    note: str = ""
    p_holm: float | None = None

    @property
    def mark(self) -> str:
        """``▲`` significantly better than the reference, ``▼`` worse (Holm-corrected p < ALPHA), else empty."""
        if self.p_holm is None or self.p_holm >= ALPHA or not self.difference:
            return ""
        return "▲" if self.difference > 0 else "▼"


#: Per-seed differences are rounded to this many decimals before they are ranked: far below any real difference of
#: two ratios of counts (1/N for a test split of N <= 10^8 images), far above floating-point noise (~1e-16).
DIFF_DECIMALS = 9


def paired_test(method: Mapping[int, float], reference: Mapping[int, float]) -> Paired:
    """Wilcoxon signed-rank over the seeds ``method`` and ``reference`` (seed -> value) have in common."""
    from scipy import stats

    seeds = sorted(s for s in set(method) & set(reference)
                   if not _missing(method[s]) and not _missing(reference[s]))
    if not seeds:
        return Paired(0, None, None, "no seeds in common, not computed")
    diffs = np.round(np.array([method[s] - reference[s] for s in seeds], float), DIFF_DECIMALS)
    difference = float(diffs.mean())
    if len(seeds) < 2:
        return Paired(1, difference, None, "n = 1, not computed")
    if not diffs.any():
        return Paired(len(seeds), 0.0, 1.0, "identical on every seed")
    note = "fewer than 6 seeds: cannot reach p < 0.05" if len(seeds) < 6 else ""
    return Paired(len(seeds), difference, wilcoxon_p(diffs), note)


#: scipy's wilcoxon runs its permutation test (every sign arrangement: exact) for ties or zeros among this many or fewer
PERMUTED_UP_TO = 13


def wilcoxon_p(diffs: np.ndarray) -> float:
    """``scipy.stats.wilcoxon(diffs, zero_method="zsplit", alternative="two-sided").pvalue``, the same number, faster
    where scipy runs a permutation test (ties or zeros among at most 13 differences: the usual case, as accuracies
    over one test split tie). There scipy calls its statistic once per sign arrangement (2^n of them: 1,024 calls,
    ~0.2 s, for 10 seeds; most of a report's time); here ``scipy.stats.permutation_test`` gets the same statistic
    vectorised: a sign flip leaves |d| and so its ranks unchanged, so R+ (with zsplit: the ranks of the positive
    differences plus half those of the zeros, multiples of 1/4, summed exactly) is one product over all arrangements.
    Elsewhere: scipy itself.
    scipy >= 1.15 (pyproject's floor) runs that permutation test; tests/unit/test_stats.py checks the two agree on
    generated differences with ties and zeros."""
    from scipy import stats

    diffs = np.asarray(diffs, dtype=np.float64)
    magnitudes = np.abs(diffs)
    zeros = diffs == 0
    ties = len(np.unique(magnitudes)) < len(magnitudes)
    # scipy's own p: many differences (its normal approximation), no ties or zeros (its exact distribution), and a
    # NaN or infinity (NaN), whose ranks the statistic below would not see as scipy does
    if len(diffs) > PERMUTED_UP_TO or not (ties or zeros.any()) or not np.isfinite(diffs).all():
        return float(stats.wilcoxon(diffs, zero_method="zsplit", alternative="two-sided").pvalue)
    ranks = stats.rankdata(magnitudes)
    half_zeros = float((zeros * ranks).sum()) / 2

    def r_plus(d: np.ndarray, axis: int = -1) -> np.ndarray:
        return ((d > 0) * ranks).sum(axis=axis) + half_zeros

    return float(stats.permutation_test((diffs,), r_plus, permutation_type="samples", vectorized=True,
                                        alternative="two-sided", axis=-1).pvalue)


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def holm(tests: Sequence[Paired]) -> None:
    """Set ``p_holm`` on every computed test of ``tests`` (one family), by Holm's step-down method."""
    computed = [t for t in tests if t.p is not None]
    if not computed:
        return
    from statsmodels.stats.multitest import multipletests

    adjusted = multipletests([t.p for t in computed], alpha=ALPHA, method="holm")[1]
    for test, p in zip(computed, adjusted):
        test.p_holm = float(p)


def holm_reachable(tests: Sequence[Paired], alpha: float = ALPHA) -> str | None:
    """A note when Holm's correction over ``tests`` leaves no test able to reach ``alpha``: the smallest two-sided
    exact Wilcoxon p over n seeds is 2 / 2**n, and Holm multiplies the smallest p by the number of tests."""
    computed = [t for t in tests if t.p is not None]
    if not computed:
        return None
    n = max(t.n for t in computed)
    if len(computed) * 2 / 2**n < alpha:
        return None
    return (f"with {len(computed)} tests in this table and {n} seeds, Holm's correction leaves no test able to reach "
            f"p < {alpha} (the smallest Wilcoxon p is 2/2^{n}); run more seeds or compare fewer methods")


FEW_BLOCKS = 10  #: below this many blocks the Friedman p-value is a permutation test's, not chi-square's
EXACT_PERMUTATIONS = 200_000  #: arrangements (methods! ** blocks) up to which the permutation test is exact
PERMUTATIONS = 9_999  #: random arrangements otherwise (seeded: the same p on every run)


@dataclass
class Friedman:
    """Ranks of ``methods`` over ``blocks`` (rank 1 = best), the Friedman test and Nemenyi's critical difference."""

    methods: list[str]
    blocks: list[str]
    average_ranks: dict[str, float]
    statistic: float | None
    p: float | None
    q_alpha: float | None
    cd: float | None
    nemenyi: "object | None"  #: pandas DataFrame of pairwise p-values (methods × methods)
    note: str = ""
    #: how ``p`` was computed: ``chi-square``, ``exact permutation`` or ``permutation (N resamples)``
    p_method: str = "chi-square"
    p_chi_square: float | None = None  #: the chi-square approximation's p, beside a permutation p


def friedman(table, alpha: float = ALPHA, higher_is_better: bool = True) -> Friedman:
    """``table``: a pandas DataFrame, one row per block, one column per method (no missing values)."""
    import pandas as pd
    from scipy import stats

    methods, blocks = [str(c) for c in table.columns], [str(i) for i in table.index]
    k, n = len(methods), len(blocks)
    ranks = table.rank(axis=1, ascending=not higher_is_better, method="average")
    average = {m: float(ranks[c].mean()) for m, c in zip(methods, table.columns)}
    if k < 3 or n < 2:
        return Friedman(methods, blocks, average, None, None, None, None, None,
                        f"needs at least 3 methods and 2 blocks (has {k} and {n}), not computed")
    with np.errstate(invalid="ignore", divide="ignore"):  # every block a tie: 0/0, answered below, not warned
        statistic, p = stats.friedmanchisquare(*[table[c].to_numpy(float) for c in table.columns])
    if not (math.isfinite(statistic) and math.isfinite(p)):  # every block a tie: no ranking to test
        return Friedman(methods, blocks, average, None, None, None, None, None,
                        "every method tied in every block, not computed")
    p_method, p_chi_square = "chi-square", float(p)
    if n < FEW_BLOCKS:  # the chi-square approximation is poor with few blocks: permute within each block
        values = table.to_numpy(float)
        arrangements = math.factorial(k) ** n
        exact = arrangements <= EXACT_PERMUTATIONS
        result = stats.permutation_test(
            tuple(values[:, j] for j in range(k)),
            lambda *columns: stats.friedmanchisquare(*columns).statistic, permutation_type="samples",
            n_resamples=np.inf if exact else PERMUTATIONS, alternative="greater", rng=np.random.default_rng(0))
        p = float(result.pvalue)
        p_method = "exact permutation" if exact else f"permutation ({PERMUTATIONS} resamples)"
    q = float(stats.studentized_range.ppf(1 - alpha, k, np.inf) / math.sqrt(2))
    cd = q * math.sqrt(k * (k + 1) / (6 * n))
    import scikit_posthocs as sp

    nemenyi = sp.posthoc_nemenyi_friedman(table.to_numpy(float))
    nemenyi = pd.DataFrame(nemenyi.to_numpy(), index=methods, columns=methods)
    return Friedman(methods, blocks, average, float(statistic), float(p), q, cd, nemenyi, "", p_method, p_chi_square)


def bootstrap_interval(labels: np.ndarray, proba: np.ndarray, metric: Callable[[np.ndarray, np.ndarray], float],
                       resamples: int, seed: int = 0, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """A percentile interval of ``metric(labels, proba)`` over ``resamples`` resamples of the test images; None when
    the metric is undefined on the resamples (e.g. AUC with one class)."""
    from scipy import stats

    def statistic(index):
        index = index.astype(int)
        return metric(labels[index], proba[index])

    try:
        result = stats.bootstrap((np.arange(len(labels)),), statistic, n_resamples=resamples, confidence_level=confidence,
                                 method="percentile", random_state=np.random.default_rng(seed), vectorized=False)
    except ValueError:
        return None
    low, high = result.confidence_interval
    return (float(low), float(high)) if np.isfinite([low, high]).all() else None
