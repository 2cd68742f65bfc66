"""The family test's error rates under unequal seed spread, by simulation (benchmarks/family_tests.py).

1,000 families per scenario with fixed RNG seeds, so each rate is a fixed number. Its Monte-Carlo
standard error is sqrt(r (1 - r) / 1000): 0.0069 at r = 0.05; a power's is the spread of the
per-family share of cells found over sqrt(1000), about 0.005. A target passes when the measured rate
is within two standard errors of it (false positives <= 0.05 + 2 se, power >= 0.85 - 2 se), so a
test fails only when the true rate is clearly on the wrong side; the README's table, from 20,000
families, gives the rates themselves.
"""

import numpy as np
import pytest

import stats
from benchmarks.family_tests import NULL_SCENARIOS, POWER_SCENARIOS, error_rates, simulate

FAMILIES = 1000


@pytest.mark.parametrize("scenario", NULL_SCENARIOS)
def test_family_wise_false_positive_rate_stays_at_alpha(scenario):
    rates = error_rates(*NULL_SCENARIOS[scenario], FAMILIES, seed=1)
    assert rates["false_positive"] <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / FAMILIES)


@pytest.mark.parametrize("scenario", ["+0.05 in every cell, equal spread, 20 cells",
                                      "+0.05 in 19 cells, one null cell 8x wider, 20 cells"])
def test_power_to_find_plus_five_points_with_three_seeds(scenario):
    rates = error_rates(*POWER_SCENARIOS[scenario], FAMILIES, seed=2)
    assert rates["power"] >= 0.85 - 2 * rates["power_se"]


def test_pooling_would_fail_where_the_test_holds():
    """The scenario is hard: one pooled variance over the family (what the outlier guard prevents)
    flags a null family with an 8x wider cell far more often than 0.05."""
    rng = np.random.default_rng(3)
    means, variances, counts, test_var = simulate(rng, FAMILIES, *NULL_SCENARIOS["one cell 8x wider, 20 cells"])
    pooled = np.broadcast_to(variances.mean(axis=1, keepdims=True), variances.shape)
    se = np.sqrt(pooled[:, 1:] / 3 + pooled[:, :1] / 3 + test_var)
    t = np.abs(means[:, 1:] - means[:, :1]) / se
    p_values = 2 * stats.sps.t.sf(t, df=counts.size * 2)
    assert np.mean((stats._holm_rows(p_values) <= 0.05).any(axis=1)) > 0.15


def test_moderated_variances_flag_the_wide_group_and_keep_its_own_variance():
    variances = np.r_[np.full(20, 1e-4), 64e-4]  # the last group 8x wider in sd
    result = stats.moderated_variances(variances, np.full(21, 3))
    assert result["shared"] and result["outlier"].tolist() == [False] * 20 + [True]
    assert result["variance"][-1] == 64e-4 and result["df"][-1] == 2
    assert result["prior_var"] == pytest.approx(1e-4) and result["prior_df"] == 40
    assert np.allclose(result["variance"][:20], 1e-4) and np.all(result["df"][:20] == 42)


def test_widespread_unequal_spread_shares_no_prior():
    variances = np.r_[np.full(11, 1e-4), np.full(10, 64e-4)]
    result = stats.moderated_variances(variances, np.full(21, 3))
    assert not result["shared"] and not result["outlier"].any()
    np.testing.assert_array_equal(result["variance"], variances)
    assert np.all(result["df"] == 2)


def test_trigamma_inverse_inverts_scipy():
    y = np.array([1e-3, 0.05, 0.5, 1.6449, 10.0])
    np.testing.assert_allclose(stats.special.polygamma(1, stats._trigamma_inverse(y)), y, rtol=1e-8)


def test_smyth_prior_matches_its_moments():
    """Unequal but not outlying spread: d0 and s0^2 solve Smyth's moment equations on log-variances."""
    variances = np.exp(np.linspace(-13, -5, 12))
    dfs = np.full(12, 2.0)
    prior_var, prior_df = stats._fit_variance_prior(variances, dfs, np.ones(12, bool))
    e = np.log(variances) - stats.special.digamma(1.0) + np.log(1.0)
    excess = e.var(ddof=1) - stats.special.polygamma(1, 1.0)
    assert stats.special.polygamma(1, prior_df / 2) == pytest.approx(excess)
    expected = np.exp(e.mean() + stats.special.digamma(prior_df / 2) - np.log(prior_df / 2))
    assert prior_var == pytest.approx(expected)
