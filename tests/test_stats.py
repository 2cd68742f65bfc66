"""Tests of stats.py against scikit-learn, scipy and hand computations."""

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import confusion_matrix, f1_score

import stats

K = 10
LABELS = list(range(K))


def sk_f1(y_true, y_pred):
    return f1_score(y_true, y_pred, average="macro", labels=LABELS, zero_division=0)


def predictions(y_true, correct, rng):
    """y_true where `correct`, else a random wrong class."""
    wrong = (y_true + rng.integers(1, K, size=y_true.shape)) % K
    return np.where(correct, y_true, wrong)


def noisy_model(n, accuracy, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, n)
    return y, predictions(y, rng.random(n) < accuracy, rng)


def better_model(y, pred_a, n_fixed, n_broken, rng):
    """pred_a with n_fixed of its errors corrected and n_broken of its right answers made wrong."""
    pred_b = pred_a.copy()
    wrong_idx = rng.choice(np.flatnonzero(pred_a != y), n_fixed, replace=False)
    right_idx = rng.choice(np.flatnonzero(pred_a == y), n_broken, replace=False)
    pred_b[wrong_idx] = y[wrong_idx]
    pred_b[right_idx] = (y[right_idx] + 1) % K
    return pred_b


# ---------------------------------------------------------------------------------------------------
# Macro-F1 (what every report's headline number is)


@pytest.mark.parametrize("seed", range(5))
def test_macro_f1_matches_sklearn_on_random_inputs(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    # Skewed class shares so some classes are rare or absent.
    probs = rng.dirichlet(np.full(K, 0.5))
    y = rng.choice(K, n, p=probs)
    pred = np.where(rng.random(n) < 0.6, y, rng.choice(K, n, p=probs))
    assert stats.macro_f1(y, pred) == pytest.approx(sk_f1(y, pred), abs=1e-12)


@pytest.mark.parametrize(
    "y_true, y_pred",
    [
        (np.arange(10), np.arange(10)),  # perfect
        (np.arange(10), np.zeros(10, dtype=int)),  # one class predicted for all
        (np.array([0, 1, 2, 3, 0, 1]), np.array([0, 1, 5, 9, 0, 2])),  # classes absent from y_true
        (np.array([3]), np.array([3])),  # one image
        (np.array([3]), np.array([4])),  # one image, wrong
        (np.array([1, 2, 3, 4]), np.array([2, 3, 4, 1])),  # all wrong
    ],
)
def test_macro_f1_matches_sklearn_on_edge_cases(y_true, y_pred):
    assert stats.macro_f1(y_true, y_pred) == pytest.approx(sk_f1(y_true, y_pred), abs=1e-12)


def test_batched_confusions_equal_a_loop_over_replicates():
    """One bincount over all replicates gives each replicate's own confusion matrix and macro-F1."""
    y, pred = noisy_model(300, 0.7, seed=1)
    idx = np.random.default_rng(2).integers(0, 300, size=(25, 300))  # (R, n)
    cms = stats.confusion_matrices(y, pred, idx)  # (R, K, K)
    f1s = stats.macro_f1_from_confusion(cms)  # (R,)
    for r in range(idx.shape[0]):
        np.testing.assert_array_equal(cms[r], confusion_matrix(y[idx[r]], pred[idx[r]], labels=LABELS))
        assert f1s[r] == pytest.approx(sk_f1(y[idx[r]], pred[idx[r]]), abs=1e-12)


def test_chunked_bootstrap_equals_per_replicate_loop(monkeypatch):
    """Chunks of replicates are stitched in draw order: chunked results equal a plain loop."""
    n, n_boot, rows = 200, 23, 5
    monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", rows * n)  # 5 replicates per chunk, last one partial
    y, pred = noisy_model(n, 0.6, seed=3)
    reps = stats.bootstrap_replicates(y, [pred, y], "f1_macro", n_boot=n_boot, seed=4)  # (2, n_boot)
    rng = np.random.default_rng(4)
    idx = np.concatenate([rng.integers(0, n, size=(min(rows, n_boot - s), n)) for s in range(0, n_boot, rows)])
    expected = [sk_f1(y[i], pred[i]) for i in idx]
    np.testing.assert_allclose(reps[0], expected, atol=1e-12)
    np.testing.assert_allclose(reps[1], 1.0)


# ---------------------------------------------------------------------------------------------------
# Bootstrap interval of one run


@pytest.mark.parametrize("metric", ["f1_macro", "accuracy"])
def test_bootstrap_ci_contains_estimate(metric):
    y, pred = noisy_model(2000, 0.85, seed=5)
    ci = stats.bootstrap_ci(y, pred, metric=metric, n_boot=300)
    reference = sk_f1(y, pred) if metric == "f1_macro" else np.mean(y == pred)
    assert ci["estimate"] == pytest.approx(reference)
    assert ci["low"] < ci["estimate"] < ci["high"]
    assert ci["n_boot"] == 300 and ci["confidence"] == 0.95
    assert ci["method"] == "percentile bootstrap over test images"


def test_bootstrap_ci_narrows_with_more_images():
    """Width shrinks like 1/sqrt(n): 100x the images, about a tenth of the width."""
    widths = []
    for n in (200, 20000):
        y, pred = noisy_model(n, 0.85, seed=6)
        ci = stats.bootstrap_ci(y, pred, n_boot=300)
        widths.append(ci["high"] - ci["low"])
    assert widths[1] < widths[0] / 5


def test_bootstrap_ci_covers_true_accuracy_about_95_percent():
    """Over many simulated test sets from a model of known accuracy, ~95% of intervals cover it."""
    true_accuracy, n_sets = 0.9, 200
    covered = 0
    for s in range(n_sets):
        y, pred = noisy_model(400, true_accuracy, seed=1000 + s)
        ci = stats.bootstrap_ci(y, pred, metric="accuracy", n_boot=400, seed=s)
        covered += ci["low"] <= true_accuracy <= ci["high"]
    assert 0.88 <= covered / n_sets <= 0.99


def test_bootstrap_ci_is_deterministic_for_a_seed():
    y, pred = noisy_model(500, 0.8, seed=7)
    a = stats.bootstrap_ci(y, pred, n_boot=200, seed=11)
    b = stats.bootstrap_ci(y, pred, n_boot=200, seed=11)
    c = stats.bootstrap_ci(y, pred, n_boot=200, seed=12)
    assert a == b
    assert (a["low"], a["high"]) != (c["low"], c["high"])


# ---------------------------------------------------------------------------------------------------
# Paired comparison of two models on the same images


def test_paired_bootstrap_of_identical_predictions_finds_nothing():
    y, pred = noisy_model(1000, 0.8, seed=8)
    res = stats.paired_bootstrap(y, pred, pred.copy(), n_boot=200)
    assert res["diff"] == 0 and res["low"] == 0 and res["high"] == 0
    assert res["p_value"] == pytest.approx(1.0)


def test_paired_bootstrap_detects_a_clearly_better_model():
    """10% more images right out of 5000 is far beyond test-set noise."""
    rng = np.random.default_rng(9)
    y, pred_a = noisy_model(5000, 0.75, seed=9)
    pred_b = better_model(y, pred_a, n_fixed=600, n_broken=100, rng=rng)
    res = stats.paired_bootstrap(y, pred_a, pred_b, n_boot=1000)
    assert res["diff"] == pytest.approx(sk_f1(y, pred_b) - sk_f1(y, pred_a))
    assert res["p_value"] < 0.01
    assert 0 < res["low"] < res["diff"] < res["high"]


def test_paired_bootstrap_calls_a_tiny_difference_noise():
    """0.2% (4 images of 2000) between models that disagree on 100 images is not significant."""
    rng = np.random.default_rng(10)
    y, pred_a = noisy_model(2000, 0.85, seed=10)
    pred_b = better_model(y, pred_a, n_fixed=52, n_broken=48, rng=rng)
    assert np.mean(pred_b == y) - np.mean(pred_a == y) == pytest.approx(0.002)
    for metric in ("f1_macro", "accuracy"):
        res = stats.paired_bootstrap(y, pred_a, pred_b, metric=metric, n_boot=1000)
        assert res["p_value"] > 0.05
        assert res["low"] < 0 < res["high"]
    assert stats.mcnemar(y, pred_a, pred_b)["p_value"] > 0.05


# ---------------------------------------------------------------------------------------------------
# McNemar


def test_mcnemar_exact_matches_binomial_test():
    rng = np.random.default_rng(11)
    y, pred_a = noisy_model(500, 0.8, seed=11)
    pred_b = better_model(y, pred_a, n_fixed=9, n_broken=3, rng=rng)
    res = stats.mcnemar(y, pred_a, pred_b)
    b = np.sum((pred_a == y) & (pred_b != y))
    c = np.sum((pred_a != y) & (pred_b == y))
    assert (res["b"], res["c"]) == (b, c) == (3, 9)
    assert res["p_value"] == pytest.approx(sps.binomtest(3, 12, 0.5).pvalue)
    assert "exact" in res["method"]


def test_mcnemar_chi_square_with_continuity_correction():
    rng = np.random.default_rng(12)
    y, pred_a = noisy_model(2000, 0.8, seed=12)
    pred_b = better_model(y, pred_a, n_fixed=40, n_broken=20, rng=rng)
    res = stats.mcnemar(y, pred_a, pred_b)
    statistic = (abs(20 - 40) - 1) ** 2 / 60
    assert (res["b"], res["c"]) == (20, 40)
    assert res["statistic"] == pytest.approx(statistic)
    assert res["p_value"] == pytest.approx(sps.chi2.sf(statistic, df=1))


def test_mcnemar_without_discordant_images():
    y, pred = noisy_model(100, 0.8, seed=13)
    res = stats.mcnemar(y, pred, pred)
    assert (res["b"], res["c"], res["p_value"]) == (0, 0, 1.0)


# ---------------------------------------------------------------------------------------------------
# Multiple comparisons


def test_holm_matches_hand_computation():
    # Sorted: 0.005 x4 = 0.02, 0.01 x3 = 0.03, 0.03 x2 = 0.06, 0.04 x1 = 0.04 -> running max 0.06.
    p = [0.01, 0.04, 0.03, 0.005]
    np.testing.assert_allclose(stats.holm_bonferroni(p), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_array_equal(stats.significant_flags(p, alpha=0.05), [True, False, False, True])
    # 0.4 x3 = 1.2 clips to 1, and the larger ones cannot fall below it.
    np.testing.assert_allclose(stats.holm_bonferroni([0.9, 0.4, 0.45]), [1.0, 1.0, 1.0])
    assert stats.holm_bonferroni([]).size == 0


@pytest.mark.parametrize("seed", range(3))
def test_holm_flags_equal_the_step_down_rule(seed):
    """Holm's definition: walk up the sorted p-values, reject while p_(i) <= alpha / (m - i)."""
    rng = np.random.default_rng(seed)
    p = np.concatenate([rng.uniform(0, 0.01, 8), rng.uniform(0, 1, 30)])
    alpha, m = 0.05, p.size
    expected = np.zeros(m, dtype=bool)
    for i, j in enumerate(np.argsort(p)):
        if p[j] > alpha / (m - i):
            break
        expected[j] = True
    np.testing.assert_array_equal(stats.significant_flags(p, alpha), expected)
    adjusted = stats.holm_bonferroni(p)
    assert np.all(adjusted >= p) and np.all(adjusted <= 1)
    assert np.all(np.diff(adjusted[np.argsort(p)]) >= 0)


# ---------------------------------------------------------------------------------------------------
# Seeds


def test_seed_summary_matches_scipy_t_interval():
    values = [0.912, 0.905, 0.918, 0.909]
    res = stats.seed_summary(values)
    low, high = sps.t.interval(0.95, df=3, loc=np.mean(values), scale=sps.sem(values))
    assert res["mean"] == pytest.approx(np.mean(values))
    assert res["std"] == pytest.approx(np.std(values, ddof=1))
    assert (res["ci_low"], res["ci_high"]) == (pytest.approx(low), pytest.approx(high))
    assert res["n"] == 4 and res["single_run"] is False


def test_seed_summary_of_one_run_is_flagged_not_nan():
    res = stats.seed_summary([0.91])
    assert res == {
        "mean": 0.91, "std": 0.0, "n": 1, "ci_low": 0.91, "ci_high": 0.91, "confidence": 0.95,
        "single_run": True,
    }
    same = stats.seed_summary([0.5, 0.5, 0.5])
    assert (same["ci_low"], same["ci_high"], same["std"]) == (0.5, 0.5, 0.0)


# ---------------------------------------------------------------------------------------------------
# A grid cell against its baseline


def test_compare_with_one_seed_equals_paired_bootstrap():
    rng = np.random.default_rng(14)
    y, base = noisy_model(1500, 0.8, seed=14)
    cell = better_model(y, base, n_fixed=60, n_broken=30, rng=rng)
    res = stats.compare_to_baseline(y, [base], [cell], n_boot=300, seed=3)
    paired = stats.paired_bootstrap(y, base, cell, n_boot=300, seed=3)
    for key in ("diff", "low", "high", "p_value"):
        assert res[key] == pytest.approx(paired[key])
    assert res["mcnemar_p"] == pytest.approx(stats.mcnemar(y, base, cell)["p_value"])
    assert res["n_seeds"] == 1 and res["paired_seeds"] is True


def test_compare_averages_seeds_and_pairs_them():
    rng = np.random.default_rng(15)
    y = rng.integers(0, K, 3000)
    base = [predictions(y, rng.random(y.size) < 0.8, rng) for _ in range(3)]
    cell = [better_model(y, b, n_fixed=250, n_broken=50, rng=rng) for b in base]
    res = stats.compare_to_baseline(y, base, cell, n_boot=300)
    seed_diffs = [sk_f1(y, c) - sk_f1(y, b) for b, c in zip(base, cell, strict=True)]
    assert res["diff"] == pytest.approx(np.mean(seed_diffs))
    np.testing.assert_allclose(res["seed_diffs"], seed_diffs)
    assert res["mcnemar_p"] == max(stats.mcnemar(y, b, c)["p_value"] for b, c in zip(base, cell, strict=True))
    assert res["p_value"] < 0.01 and res["low"] > 0
    assert res["n_seeds"] == 3


def test_compare_with_unequal_seed_counts_uses_means():
    rng = np.random.default_rng(16)
    y = rng.integers(0, K, 1000)
    base = [predictions(y, rng.random(y.size) < 0.8, rng) for _ in range(2)]
    cell = [predictions(y, rng.random(y.size) < 0.8, rng) for _ in range(3)]
    res = stats.compare_to_baseline(y, base, cell, n_boot=200)
    assert res["diff"] == pytest.approx(np.mean([sk_f1(y, c) for c in cell]) - np.mean([sk_f1(y, b) for b in base]))
    assert res["paired_seeds"] is False and res["seed_diffs"] is None
    assert len(res["mcnemar_p_per_pair"]) == 2
    assert (res["n_seeds"], res["n_baseline_seeds"]) == (3, 2)


# ---------------------------------------------------------------------------------------------------
# Formatting and input checks


def test_format_estimate():
    assert stats.format_estimate(0.91234, 0.9049, 0.91801) == "0.912 [0.905, 0.918]"


def test_bad_inputs_are_rejected():
    y = np.array([0, 1, 2])
    with pytest.raises(ValueError):
        stats.macro_f1(y, np.array([0, 1]))  # lengths differ
    with pytest.raises(ValueError):
        stats.macro_f1(y, np.array([0, 1, 10]))  # label outside 0..9
    with pytest.raises(ValueError):
        stats.bootstrap_ci(y, y, metric="f1_micro")
    with pytest.raises(ValueError):
        stats.holm_bonferroni([0.5, 1.5])
    with pytest.raises(ValueError):
        stats.seed_summary([])
