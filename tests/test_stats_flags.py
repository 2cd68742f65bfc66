"""Flags and intervals a reader can trust: still_improving, at_chance on the interval, cell_estimate's
coverage. Simulations with fixed RNG seeds; each states its Monte-Carlo error."""

import numpy as np
import pytest

import stats
from config import ConfigError
from tests.test_stats import K, simulate_family, sk_f1

# ---------------------------------------------------------------------------------------------------
# still_improving: the trend over the last epochs against the run's own noise

EPOCHS, NOISE_SD, RUNS = 15, 0.003, 2000  # validation macro-F1 jitter of about 7,000 images


def learning_curves(rng, gain_left: float, runs: int = RUNS, tau: float = 5.0) -> np.ndarray:
    """(runs, EPOCHS) validation F1: an exponential approach to 0.93 with gain_left still to gain after
    the last epoch (time constant tau epochs; gain_left 0: converged), plus independent epoch noise."""
    epochs = np.arange(1, EPOCHS + 1)
    curve = 0.93 - gain_left * np.exp((EPOCHS - epochs) / tau)
    return np.clip(curve, 0.1, None) + NOISE_SD * rng.standard_normal((runs, EPOCHS))


def flagged_share(curves, **options) -> float:
    return float(np.mean([stats.still_improving(c, **options) for c in curves]))


def test_converged_runs_are_rarely_flagged():
    """At most 10% (the test's level is 5%); the Monte-Carlo se of a 5% rate over 2,000 runs is 0.005."""
    rng = np.random.default_rng(40)
    assert flagged_share(learning_curves(rng, 0.0)) <= 0.10


def test_a_run_with_a_point_still_to_gain_is_flagged():
    """0.01 macro-F1 still to gain after 15 epochs: flagged at least 80% of the time (se about 0.009);
    the last-epoch rule caught about a third of them."""
    rng = np.random.default_rng(41)
    curves = learning_curves(rng, 0.01)
    assert flagged_share(curves) >= 0.80
    last_epoch_rule = np.mean(curves[:, -1] - curves[:, :-1].max(axis=1) > stats.STILL_IMPROVING_GAIN)
    assert last_epoch_rule < 0.5


def test_annealing_is_not_improvement():
    """One-cycle: the learning rate falls to ~0 over the last epochs and validation F1 rises with it; the
    same curve at a constant rate is flagged."""
    rng = np.random.default_rng(42)
    curve = learning_curves(rng, 0.02, runs=1)[0]
    steps = np.linspace(0, 1, EPOCHS)
    one_cycle = np.where(steps < 0.3, steps / 0.3, 0.5 * (1 + np.cos(np.pi * (steps - 0.3) / 0.7))) * 3e-3
    assert stats.still_improving(curve, lrs=[1e-3] * EPOCHS)
    assert not stats.still_improving(curve, lrs=one_cycle)
    with pytest.raises(ConfigError, match="one learning rate per epoch"):
        stats.still_improving(curve, lrs=[1e-3])


def test_trend_t_matches_scipy_linregress():
    from scipy.stats import linregress

    y = np.array([0.80, 0.83, 0.82, 0.86, 0.85, 0.88])
    fit = linregress(np.arange(6), y)
    assert stats.trend_t(y) == pytest.approx(fit.slope / fit.stderr)
    assert stats.trend_t(np.arange(5.0)) == np.inf and stats.trend_t(np.ones(5)) == 0


# ---------------------------------------------------------------------------------------------------
# at_chance on the interval


def test_an_interval_reaching_the_chance_band_is_at_chance():
    y = np.random.default_rng(43).integers(0, K, 2000)
    band = stats.chance_band(y)
    assert not stats.at_chance(0.255, y)  # the mean alone clears the band ...
    assert stats.at_chance(0.255, y, low=0.065)  # ... its interval does not (the quick study's cell)
    assert not stats.at_chance(0.255, y, low=band + 0.01)


# ---------------------------------------------------------------------------------------------------
# A cell's interval: seeds and test images


def test_multi_seed_interval_covers_the_population_mean():
    """3 seeds on one shared test set of 2,000 images (shared item difficulty), 400 simulated cells: the
    interval covers the population accuracy (0.8 mean over seeds) at least 93% of the time; the Monte-
    Carlo se of a 95% coverage is 0.011. A t-interval over seeds alone misses the shared test set's
    own luck and covers clearly less."""
    rng = np.random.default_rng(44)
    covered, seeds_only = [], []
    for _ in range(400):
        y, base, _ = simulate_family(rng, 2000, 0, 3, seed_sd=0.01, effect=0.0)
        est = stats.cell_estimate(y, base, metric="accuracy")
        covered.append(est["low"] <= 0.8 <= est["high"])
        summary = stats.seed_summary([np.mean(p == y) for p in base])
        seeds_only.append(summary["ci_low"] <= 0.8 <= summary["ci_high"])
    assert np.mean(covered) >= 0.93
    assert np.mean(seeds_only) < np.mean(covered) - 0.03


def test_cell_estimate_kinds_and_formula():
    rng = np.random.default_rng(45)
    y, base, _ = simulate_family(rng, 1500, 0, 3, seed_sd=0.02, effect=0.0)
    est = stats.cell_estimate(y, base)
    values = np.array([sk_f1(y, p) for p in base])
    assert est["mean"] == pytest.approx(values.mean()) and est["kind"] == stats.SEEDS_AND_IMAGES
    half = stats.sps.t.ppf(0.975, 2) * np.sqrt(values.var(ddof=1) / 3 + est["test_se"] ** 2)
    assert (est["low"], est["high"]) == (pytest.approx(values.mean() - half), pytest.approx(values.mean() + half))
    one = stats.cell_estimate(y, base[:1])
    assert one["kind"] == stats.IMAGES_ONLY and one["df"] is None and one["low"] < one["mean"] < one["high"]
    boot = stats.bootstrap_ci(y, base[0], n_boot=2000)
    assert one["high"] - one["low"] == pytest.approx(boot["high"] - boot["low"], rel=0.1)
