"""How sure a number is: bootstrap intervals, paired tests and multiple-comparison control.

Every F1 in the study is a mean over evaluation examples, and every comparison the paper's
findings make (real against synthetic data, top-k against random-k knockout, patched
against unpatched heads) is between two models run on the same examples. Intervals are
therefore paired bootstrap intervals over examples (scipy.stats.bootstrap, BCa when the
sample allows it, percentile otherwise), tests are paired sign-flip permutation tests
(scipy.stats.permutation_test), rank correlations carry a permutation p-value, and a sweep
(knockout over k) is corrected with Benjamini-Hochberg (scipy.stats.false_discovery_control). Per-head score intervals resample the examples of all
heads at once (`column_intervals`); `bootstrap_interval` takes any statistic of independent
samples. A share of heads (the recall of one head set in another) gets the Wilson interval of
a proportion (`proportion_interval`): a head set is the support of a union over examples, a
statistic the bootstrap does not estimate (a resample drops every head seen in one example
only, so the bootstrap distribution can lie entirely beside the estimate).

Example:
    >>> iv = mean_interval([1.0, 0.0, 1.0, 1.0])
    >>> iv.low <= iv.estimate <= iv.high
    True
    >>> paired_difference([1, 1, 1, 0], [0, 0, 1, 0]).estimate
    0.5
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

LEVEL = 0.95
RESAMPLES = 4000
SEED = 0


@dataclass(frozen=True)
class Interval:
    """A point estimate with its confidence interval; n is the number of units resampled."""

    estimate: float
    low: float
    high: float
    n: int
    level: float = LEVEL

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def sign(self) -> int:
        """+1 if the interval lies above zero, -1 below, 0 if it spans zero (or is undefined)."""
        return 1 if self.low > 0 else -1 if self.high < 0 else 0

    def text(self, digits: int = 3) -> str:
        f = f"{{:.{digits}f}}"
        if math.isnan(self.estimate):
            return "–"
        return f"{f.format(self.estimate)} [{f.format(self.low)}, {f.format(self.high)}]"


NAN_INTERVAL = Interval(math.nan, math.nan, math.nan, 0)


def mean_interval(values: Sequence[float], level: float = LEVEL, seed: int = SEED) -> Interval:
    """The mean of `values` with a bootstrap confidence interval over them."""
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return NAN_INTERVAL
    mean = float(x.mean())
    if x.size == 1 or np.all(x == x[0]):
        return Interval(mean, mean, mean, int(x.size), level)  # no spread to resample
    low, high = _bootstrap((x,), np.mean, level, seed)
    return Interval(mean, low, high, int(x.size), level)


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = LEVEL, seed: int = SEED) -> Interval:
    """mean(a - b) over paired units (the same examples), with a bootstrap interval."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired_difference: {a.size} values against {b.size}; pair them by example first")
    return mean_interval(a - b, level, seed)


def paired_p_value(a: Sequence[float], b: Sequence[float], seed: int = SEED,
                   alternative: str = "two-sided") -> float:
    """p-value of mean(a - b) = 0 by a sign-flip permutation test over paired units.

    Pairs that tie (difference 0) flip to themselves, so they are left out: the test is
    exact (all 2^m sign flips) for up to 13 untied pairs, else 9,999 random flips. NaN if
    there are no pairs; 1.0 if every difference is zero.
    """
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    d = d[~np.isnan(d)]
    if d.size == 0:
        return math.nan
    d = d[d != 0]
    if d.size == 0:
        return 1.0
    if d.size == 1:  # two sign flips, d and -d (scipy's test needs two observations)
        flips = np.array([d[0], -d[0]])
        if alternative == "greater":
            return float(np.mean(flips >= d[0]))
        if alternative == "less":
            return float(np.mean(flips <= d[0]))
        return 1.0
    res = stats.permutation_test((d,), np.mean, permutation_type="samples", alternative=alternative,
                                 n_resamples=9999, random_state=seed)
    return float(res.pvalue)


def benjamini_hochberg(p_values: Sequence[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (NaN stays NaN, the rest adjusted together)."""
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, math.nan)
    ok = ~np.isnan(p)
    if ok.any():
        out[ok] = stats.false_discovery_control(p[ok], method="bh")
    return [float(v) for v in out]


@dataclass(frozen=True)
class RankCorrelation:
    """Spearman's rho over n points and its two-sided permutation p-value."""

    rho: float
    p_value: float
    n: int


def spearman_permutation(x: Sequence[float], y: Sequence[float], seed: int = SEED) -> RankCorrelation:
    """Spearman's rho with a two-sided permutation p-value (exact, over all pairings, for n <= 7).

    NaN (n kept) when either side is constant or n < 3: no order to correlate.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    n = int(x.size)
    if n < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return RankCorrelation(math.nan, math.nan, n)

    def rho(a):
        return stats.spearmanr(a, y).statistic

    # One sample, re-paired against the fixed y: all n! pairings when that is within the budget.
    res = stats.permutation_test((x,), rho, permutation_type="pairings", n_resamples=9999, random_state=seed)
    return RankCorrelation(float(rho(x)), float(res.pvalue), n)


def column_intervals(values, level: float = LEVEL, seed: int = SEED) -> list[Interval]:
    """The mean of every column of `values` (`[units, columns]`) with a bootstrap interval over
    the units (rows), all columns resampled together (one scipy.stats.bootstrap call).

    Rows holding a NaN are left out (for head scores: an example with no located answer span
    counts for no head). A constant column has the zero-width interval at its value; BCa where it
    is defined, percentile where it is not.
    """
    x = np.asarray(values, dtype=float)
    if x.ndim != 2:
        raise ValueError(f"column_intervals: expected [units, columns], got shape {x.shape}")
    x = x[~np.isnan(x).any(axis=1)]
    n, m = x.shape
    if n == 0:
        return [NAN_INTERVAL] * m
    mean = x.mean(axis=0)
    low, high = mean.copy(), mean.copy()
    varied = ~np.all(x == x[0], axis=0)
    if n > 1 and varied.any():
        sub = x[:, varied]
        got = np.full((2, sub.shape[1]), np.nan)
        batch = max(1, 2_000_000 // (sub.shape[1] * n))  # resamples per step: ~16 MB at a time
        for method in ("BCa", "percentile"):
            todo = np.isnan(got).any(axis=0)
            if not todo.any():
                break
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = stats.bootstrap((sub[:, todo],), np.mean, axis=0, vectorized=True, n_resamples=RESAMPLES,
                                      confidence_level=level, method=method, random_state=seed, batch=batch)
            got[0, todo], got[1, todo] = res.confidence_interval.low, res.confidence_interval.high
        low[varied], high[varied] = got
    return [Interval(float(e), float(lo), float(hi), int(n), level) for e, lo, hi in zip(mean, low, high)]


def proportion_interval(k: int, n: int, level: float = LEVEL) -> Interval:
    """k of n with the Wilson score interval (scipy.stats.binomtest); NaN when n is 0."""
    if n == 0:
        return NAN_INTERVAL
    ci = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return Interval(k / n, float(ci.low), float(ci.high), int(n), level)


def bootstrap_interval(samples: Sequence, statistic, level: float = LEVEL, seed: int = SEED,
                       vectorized: bool = False, batch: int | None = None,
                       methods: tuple[str, ...] = ("BCa", "percentile")) -> Interval:
    """Any statistic of one or more independent samples, with a bootstrap interval.

    Each sample is resampled on its own (units of different samples are not paired).
    `statistic(*resampled)` gets the resampled arrays; for statistics of grouped data, pass
    the units' indices as samples and index inside `statistic`. A `vectorized` statistic takes
    `axis` and arrays with resamples along the leading axes (scipy.stats.bootstrap's contract),
    `batch` resamples at a time. `methods` are tried in turn until one gives an interval.
    """
    samples = tuple(np.asarray(s) for s in samples)
    estimate = float(statistic(*samples, axis=-1) if vectorized else statistic(*samples))
    n = int(sum(s.shape[0] for s in samples))
    if any(s.shape[0] < 2 for s in samples):
        return Interval(estimate, math.nan, math.nan, n, level)
    low, high = _bootstrap(samples, statistic, level, seed, vectorized=vectorized, batch=batch, methods=methods)
    return Interval(estimate, low, high, n, level)


def _bootstrap(data: tuple, statistic, level: float, seed: int, vectorized: bool = False,
               batch: int | None = None, methods: tuple[str, ...] = ("BCa", "percentile")) -> tuple[float, float]:
    """(low, high) of a bootstrap interval: BCa, or percentile where BCa is undefined."""
    for method in methods:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = stats.bootstrap(data, statistic, vectorized=vectorized, n_resamples=RESAMPLES, batch=batch,
                                  confidence_level=level, method=method, random_state=seed)
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if not (math.isnan(low) or math.isnan(high)):
            return low, high
    return math.nan, math.nan
