"""engine.stats against brute-force references: every sign flip, every pairing, BH by hand."""

import itertools
import math

import numpy as np
import pytest
from scipy import stats as sp

from engine.stats import (Interval, benjamini_hochberg, mean_interval, paired_difference, paired_p_value,
                          spearman_permutation)


def test_mean_interval_matches_the_normal_approximation_on_a_large_sample():
    x = np.r_[np.ones(100), np.zeros(100)]  # mean 0.5, standard error 0.5 / sqrt(200)
    iv = mean_interval(x)
    half = 1.96 * 0.5 / math.sqrt(200)
    assert iv.estimate == 0.5 and iv.n == 200
    assert iv.low == pytest.approx(0.5 - half, abs=0.01) and iv.high == pytest.approx(0.5 + half, abs=0.01)


def test_constant_and_empty_samples():
    assert mean_interval([0.25, 0.25, 0.25]) == Interval(0.25, 0.25, 0.25, 3)
    assert math.isnan(mean_interval([]).estimate) and mean_interval([]).n == 0
    assert mean_interval([math.nan, 1.0]).n == 1


def test_interval_sign_and_text():
    assert Interval(0.2, 0.1, 0.3, 5).sign() == 1 and Interval(-0.2, -0.3, -0.1, 5).sign() == -1
    assert Interval(0.0, -0.1, 0.1, 5).sign() == 0 and not Interval(0.0, -0.1, 0.1, 5).excludes_zero()
    assert Interval(0.25, 0.125, 0.5, 5).text() == "0.250 [0.125, 0.500]"


def test_paired_difference_is_the_mean_of_differences():
    a, b = [1.0, 0.5, 1.0, 0.0], [0.0, 0.5, 0.5, 0.0]
    assert paired_difference(a, b).estimate == pytest.approx(0.375)
    with pytest.raises(ValueError, match="pair them"):
        paired_difference([1.0, 2.0], [1.0])


@pytest.mark.parametrize("seed", range(4))
def test_paired_p_value_is_the_exact_sign_flip_test(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.uniform(size=9), rng.uniform(size=9)
    d = a - b
    observed = abs(d.mean())
    flips = [abs((d * np.array(s)).mean()) >= observed - 1e-12 for s in itertools.product((1, -1), repeat=9)]
    assert paired_p_value(a, b) == pytest.approx(sum(flips) / len(flips))


def test_paired_p_value_edge_cases():
    assert paired_p_value([1, 1], [1, 1]) == 1.0
    # one untied pair: its two sign flips, +0.5 and -0.5 (a knockout on which one example differs)
    assert paired_p_value([1, 1, 1], [1, 0.5, 1]) == 1.0
    assert paired_p_value([1, 1, 1], [1, 0.5, 1], alternative="greater") == 0.5
    assert paired_p_value([1, 1, 1], [1, 0.5, 1], alternative="less") == 1.0
    assert math.isnan(paired_p_value([], []))


def test_benjamini_hochberg_by_hand():
    # sorted p 0.01, 0.02, 0.03, 0.04 of m = 5 -> 0.05, 0.05, 0.05, 0.05; 0.5 -> 0.5
    p = [0.04, 0.01, 0.5, 0.03, 0.02]
    assert benjamini_hochberg(p) == pytest.approx([0.05, 0.05, 0.5, 0.05, 0.05])
    out = benjamini_hochberg([0.01, math.nan])
    assert out[0] == pytest.approx(0.01) and math.isnan(out[1])


def test_spearman_permutation_is_exact_over_all_pairings():
    x, y = [1, 2, 3, 4, 5, 6], [2, 1, 4, 3, 6, 5]
    rho = sp.spearmanr(x, y).statistic
    perms = [sp.spearmanr(x, p).statistic for p in itertools.permutations(y)]
    expected = sum(abs(r) >= abs(rho) - 1e-12 for r in perms) / len(perms)
    result = spearman_permutation(x, y)
    assert result.rho == pytest.approx(rho) and result.n == 6
    assert result.p_value == pytest.approx(expected)


def test_spearman_undefined_cases_keep_n():
    assert spearman_permutation([1, 2], [2, 1]).n == 2 and math.isnan(spearman_permutation([1, 2], [2, 1]).rho)
    assert math.isnan(spearman_permutation([1, 1, 1], [1, 2, 3]).p_value)


def test_column_intervals_equal_one_interval_per_column():
    """All heads resampled in one scipy call give each column the interval `mean_interval` gives it
    alone (the same resampled rows); constant columns get zero width; NaN rows count for none."""
    from engine.stats import column_intervals

    rng = np.random.default_rng(1)
    x = rng.uniform(size=(25, 5))
    x[:, 1] = 0.0
    x[:, 3] = rng.uniform(size=25) > 0.8
    x = np.vstack([x, np.full((1, 5), math.nan)])
    got = column_intervals(x)
    for j, iv in enumerate(got):
        want = mean_interval(x[:-1, j])
        assert iv.n == 25 and iv.estimate == pytest.approx(want.estimate)
        assert (iv.low, iv.high) == pytest.approx((want.low, want.high), abs=1e-9)
    assert (got[1].low, got[1].high) == (0.0, 0.0)
    with pytest.raises(ValueError, match=r"expected \[units, columns\]"):
        column_intervals(np.zeros(3))


def test_proportion_interval_is_wilsons_by_hand():
    from engine.stats import proportion_interval

    k, n, z = 7, 10, sp.norm.ppf(0.975)
    center = (k + z * z / 2) / (n + z * z)
    half = z / (n + z * z) * math.sqrt(k * (n - k) / n + z * z / 4)
    iv = proportion_interval(k, n)
    assert iv.estimate == 0.7 and iv.n == 10
    assert (iv.low, iv.high) == pytest.approx((center - half, center + half))
    assert math.isnan(proportion_interval(0, 0).estimate)


def test_bootstrap_interval_of_a_two_sample_statistic_matches_the_normal_approximation():
    from engine.stats import bootstrap_interval

    a, b = np.r_[np.ones(150), np.zeros(150)], np.r_[np.ones(60), np.zeros(240)]  # 0.5 and 0.2
    iv = bootstrap_interval((a, b), lambda x, y: np.mean(x) - np.mean(y))
    half = 1.96 * math.sqrt(0.25 / 300 + 0.16 / 300)
    assert iv.estimate == pytest.approx(0.3) and iv.n == 600
    assert iv.low == pytest.approx(0.3 - half, abs=0.01) and iv.high == pytest.approx(0.3 + half, abs=0.01)
    vectorized = bootstrap_interval((a, b), lambda x, y, axis=-1: np.mean(x, axis=axis) - np.mean(y, axis=axis),
                                    vectorized=True)
    assert (vectorized.low, vectorized.high) == pytest.approx((iv.low, iv.high), abs=1e-9)
    assert math.isnan(bootstrap_interval(([1.0], [0.0, 1.0]), lambda x, y: np.mean(x)).low)
