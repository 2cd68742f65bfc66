"""Tests of stats.py against scikit-learn, scipy and hand computations."""

import json

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

import stats
from config import ConfigError

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


# ---------------------------------------------------------------------------------------------------
# McNemar


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


def values_with_sd(sd, n, mean=0.9):
    """n per-seed values whose sample standard deviation (ddof=1) is exactly sd."""
    z = np.linspace(-1, 1, n)
    return mean + sd * z / z.std(ddof=1)


def welch_power(sd_cell, n_cell, sd_base, n_base, effect, level, rng, reps=4000):
    """Monte-Carlo power of scipy's two-sided Welch t test at `level` for a true difference `effect`."""
    cell = rng.normal(effect, sd_cell, (reps, n_cell))
    base = rng.normal(0.0, sd_base, (reps, n_base))
    return float(np.mean(sps.ttest_ind(cell, base, axis=1, equal_var=False).pvalue <= level))


@pytest.mark.parametrize("sd_cell, sd_base, family_size", [(0.01, 0.01, 1), (0.02, 0.01, 5), (0.01, 0.015, 20)])
def test_seeds_for_effect_is_the_smallest_count_with_the_power(sd_cell, sd_base, family_size):
    """Against scipy's Welch test simulated at the variances the pilot saw: the count it returns has
    power >= 0.8 (Monte-Carlo se 0.006 at 4,000 draws), one seed fewer has less."""
    rng = np.random.default_rng(7)
    n = stats.seeds_for_effect(values_with_sd(sd_cell, 3), values_with_sd(sd_base, 3), min_effect=0.03,
                               family_size=family_size, seeds_max=40)
    assert 3 < n < 40
    level = 0.05 / family_size
    assert welch_power(sd_cell, n, sd_base, n, 0.03, level, rng) >= 0.8 - 0.015
    assert welch_power(sd_cell, n - 1, sd_base, n - 1, 0.03, level, rng) < 0.8 + 0.015


def test_seeds_for_effect_reads_variances_never_the_difference():
    cell, base = values_with_sd(0.02, 3), values_with_sd(0.01, 3)
    needed = stats.seeds_for_effect(cell, base, family_size=10)
    for shift in (-0.3, -0.02, 0.0, 0.05):
        assert stats.seeds_for_effect(cell + shift, base, family_size=10) == needed


def test_seeds_for_effect_grows_with_spread_family_and_test_noise_within_its_bounds():
    base = values_with_sd(0.01, 3)

    def need(sd, **options):
        return stats.seeds_for_effect(values_with_sd(sd, 3), base, **({"seeds_max": 30} | options))

    assert need(0.005) <= need(0.01) <= need(0.02) <= need(0.04)
    assert need(0.01) < need(0.02)
    assert need(0.01, family_size=1) < need(0.01, family_size=48)
    assert need(0.01, test_se=0.0) < need(0.01, test_se=0.008)
    assert need(0.01, min_effect=0.05) < need(0.01, min_effect=0.02)
    # Never below the seeds already run, never above the cap (the cap when the power is out of reach).
    assert stats.seeds_for_effect(values_with_sd(0.001, 5), base, min_effect=0.1) == 5
    assert stats.seeds_for_effect(values_with_sd(0.08, 3), base, seeds_max=8) == 8
    assert stats.seeds_for_effect(values_with_sd(0.0, 3), values_with_sd(0.0, 3)) == 3
    # A baseline already topped up needs fewer cell seeds than one that stays at 3.
    assert need(0.01, baseline_seeds=3) >= need(0.01, baseline_seeds=12)


def test_seeds_for_effect_rejects_what_it_cannot_plan_from():
    with pytest.raises(ConfigError, match="at least 2 seeds"):
        stats.seeds_for_effect([0.9], [0.9, 0.91])
    with pytest.raises(ConfigError, match="min_effect"):
        stats.seeds_for_effect([0.9, 0.91], [0.9, 0.91], min_effect=0)
    with pytest.raises(ConfigError, match="finite"):
        stats.seeds_for_effect([0.9, float("nan")], [0.9, 0.91])
    with pytest.raises(ConfigError, match="baseline_seeds"):
        stats.seeds_for_effect([0.9, 0.91], [0.9, 0.91, 0.92], baseline_seeds=2)


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


# ---------------------------------------------------------------------------------------------------
# All metrics from one confusion matrix (what training.compute_metrics returns)


def sklearn_report(y_true, y_pred):
    ref = {"accuracy": accuracy_score(y_true, y_pred)}
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=LABELS, average=average, zero_division=0)
        ref |= {f"precision_{average}": p, f"recall_{average}": r, f"f1_{average}": f}
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=LABELS, average=None, zero_division=0)
    ref |= {"precision_per_class": p, "recall_per_class": r, "f1_per_class": f, "support": s}
    ref["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=LABELS)
    return ref


def skewed_labels_and_predictions(seed, n=300):
    """Skewed class shares (weighted and macro averages differ), 60% right."""
    rng = np.random.default_rng(seed)
    y = rng.choice(K, n, p=np.arange(1, 11) / 55)
    return y, np.where(rng.random(n) < 0.6, y, rng.integers(0, K, n))


METRIC_CASES = {
    "skewed random": skewed_labels_and_predictions(0),
    "skewed random, other seed": skewed_labels_and_predictions(1),
    "class never predicted": ([0, 1, 2, 3, 3, 4, 5, 6, 7, 8, 9], [0, 1, 2, 4, 4, 4, 5, 6, 7, 8, 9]),
    "class absent from y_true": ([0, 0, 1, 1, 2, 2], [0, 9, 1, 1, 2, 0]),
    "single class, all wrong": ([4] * 7, [2] * 7),
    "one image": ([3], [3]),
}


@pytest.mark.parametrize("case", METRIC_CASES)
def test_metrics_from_confusion_match_sklearn(case):
    y_true, y_pred = (np.asarray(a) for a in METRIC_CASES[case])
    cm = confusion_matrix(y_true, y_pred, labels=LABELS)
    ours = stats.metrics_from_confusion(cm)
    ref = sklearn_report(y_true, y_pred)
    assert set(ours) == set(ref)
    for key, expected in ref.items():
        np.testing.assert_allclose(np.asarray(ours[key], dtype=float), np.asarray(expected, dtype=float),
                                   rtol=1e-12, atol=1e-12, err_msg=key)
    np.testing.assert_allclose(stats.per_class_f1(cm), ref["f1_per_class"], atol=1e-12)
    json.dumps(ours)
    assert type(ours["accuracy"]) is float
    assert all(type(n) is int for row in ours["confusion_matrix"] for n in row)


def test_metrics_from_confusion_rejects_what_is_not_a_count_matrix():
    with pytest.raises(ConfigError, match="square"):
        stats.metrics_from_confusion(np.zeros((3, 4), dtype=int))
    with pytest.raises(ConfigError, match="integer"):
        stats.metrics_from_confusion(np.full((2, 2), 0.5))
    with pytest.raises(ConfigError, match="empty"):
        stats.metrics_from_confusion(np.zeros((10, 10), dtype=int))


# ---------------------------------------------------------------------------------------------------
# A family of cells against one baseline, with several seeds each


def simulate_family(rng, n_images, n_cells, n_seeds, seed_sd, effect, base_accuracy=0.8, difficulty_sd=1.5):
    """Predictions of a baseline and n_cells cells, n_seeds training seeds each, on the same images.

    Image i has a difficulty d_i shared by every model (hard images are hard for all); model m with
    ability a_m is right where a_m - d_i + e_mi > 0, e_mi ~ N(0, 1) its own per-image noise, and
    otherwise predicts a uniformly drawn wrong class (so macro-F1 is about accuracy). The ability is
    set so the model's accuracy on the image population is base_accuracy (+ effect for the cells)
    + seed_sd * N(0, 1): seed_sd is the spread of accuracy between training seeds.
    Returns y (n,), baseline [(n,)] * n_seeds, {cell name: [(n,)] * n_seeds}.
    """
    n_models = n_cells + 1
    y = rng.integers(0, K, n_images)
    difficulty = rng.normal(0.0, difficulty_sd, n_images)  # (n,)
    shift = np.r_[0.0, np.full(n_cells, effect)][:, None]  # (models, 1)
    accuracy = base_accuracy + shift + seed_sd * rng.standard_normal((n_models, n_seeds))  # (models, seeds)
    # P(a - d + e > 0) over d ~ N(0, sd^2) and e ~ N(0, 1) is Phi(a / sqrt(1 + sd^2)).
    ability = sps.norm.ppf(accuracy) * np.sqrt(1 + difficulty_sd**2)
    right = ability[..., None] - difficulty > rng.standard_normal((n_models, n_seeds, n_images))
    wrong = (y + rng.integers(1, K, right.shape)) % K
    preds = np.where(right, y, wrong)  # (models, seeds, n)
    return y, list(preds[0]), {f"cell {c}": list(preds[c + 1]) for c in range(n_cells)}


def jackknife_se_of_difference(y, baseline, cell, metric):
    """Jackknife standard error over test images of mean metric(cell seeds) - mean metric(baseline seeds)."""
    n = y.size
    leave_one_out = np.zeros(n)
    for preds, weight in ((baseline, -1 / len(baseline)), (cell, 1 / len(cell))):
        for pred in preds:
            codes = y * K + pred
            cms = np.tile(confusion_matrix(y, pred, labels=LABELS).reshape(-1), (n, 1))  # (n, K*K)
            cms[np.arange(n), codes] -= 1  # image i left out of row i
            cms = cms.reshape(n, K, K)
            if metric == "f1_macro":
                leave_one_out += weight * stats.macro_f1_from_confusion(cms)
            else:
                leave_one_out += weight * np.trace(cms, axis1=1, axis2=2) / (n - 1)
    return np.sqrt((n - 1) / n * np.sum((leave_one_out - leave_one_out.mean()) ** 2))


def test_family_verdict_equals_the_formula_from_scikit_learn_scores():
    """Three groups are too few to fit a prior: every cell is compared Welch-style with scikit-learn's
    per-seed scores, the jackknife's test-image variance and the smaller group's degrees of freedom."""
    rng = np.random.default_rng(20)
    y, base, cells = simulate_family(rng, 1500, 2, 3, seed_sd=0.02, effect=0.03)
    cells["cell 1"] = cells["cell 1"][:2]
    verdicts = stats.compare_family(y, base, cells)
    scores = {name: np.array([sk_f1(y, p) for p in preds]) for name, preds in cells.items()}
    base_scores = np.array([sk_f1(y, p) for p in base])
    for name, v in verdicts.items():
        diff = scores[name].mean() - base_scores.mean()
        test_se = jackknife_se_of_difference(y, base, cells[name], "f1_macro")
        se = np.sqrt(scores[name].var(ddof=1) / scores[name].size + base_scores.var(ddof=1) / 3 + v["test_se"] ** 2)
        df = min(scores[name].size, 3) - 1
        assert v["diff"] == pytest.approx(diff, abs=1e-12)
        assert v["cell_mean"] == pytest.approx(scores[name].mean())
        assert v["baseline_mean"] == pytest.approx(base_scores.mean())
        assert v["test_se"] == pytest.approx(test_se, rel=0.02)  # delta method vs jackknife
        assert v["seed_sd"] == pytest.approx(scores[name].std(ddof=1))
        assert v["baseline_seed_sd"] == pytest.approx(base_scores.std(ddof=1))
        assert v["df"] == df and v["method"] == stats.WELCH_METHOD
        assert v["se"] == pytest.approx(se)
        assert v["p_value"] == pytest.approx(2 * sps.t.sf(abs(diff) / se, df))
        half = sps.t.ppf(0.975, df) * se
        assert (v["low"], v["high"]) == (pytest.approx(diff - half), pytest.approx(diff + half))
        assert (v["n_seeds"], v["n_baseline_seeds"]) == (scores[name].size, 3)
        assert v["reason"] is None and v["family_size"] == v["family_tested"] == 2
        assert v["shared_prior"] is False and v["outliers"] == [] and v["prior_sd"] is None
    np.testing.assert_allclose([v["p_holm"] for v in verdicts.values()],
                               stats.holm_bonferroni([v["p_value"] for v in verdicts.values()]))
    assert [v["significant"] for v in verdicts.values()] == [v["p_holm"] <= 0.05 for v in verdicts.values()]
    json.dumps(verdicts)


def test_equal_spread_shares_the_pooled_variance():
    """Many groups of equal spread: the prior is the pooled variance with the family's degrees of freedom,
    and each cell's variance is the moderated one, never below its own."""
    rng = np.random.default_rng(31)
    y, base, cells = simulate_family(rng, 1500, 9, 3, seed_sd=0.01, effect=0.0)
    verdicts = stats.compare_family(y, base, cells)
    groups = [np.array([sk_f1(y, p) for p in preds]) for preds in [base, *cells.values()]]
    pooled = np.mean([g.var(ddof=1) for g in groups])
    one = next(iter(verdicts.values()))
    assert one["shared_prior"] is True and one["outliers"] == []
    assert one["prior_sd"] == pytest.approx(np.sqrt(pooled)) and one["prior_df"] == 20
    for group, v in zip(groups[1:], verdicts.values(), strict=True):
        moderated = max(group.var(ddof=1), (20 * pooled + 2 * group.var(ddof=1)) / 22)
        assert v["seed_sd"] == pytest.approx(np.sqrt(moderated))
        assert v["df"] == 22 and v["method"] == stats.MODERATED_METHOD


def test_a_wide_cell_keeps_its_own_variance_and_is_named():
    rng = np.random.default_rng(32)
    y, base, cells = simulate_family(rng, 1500, 9, 3, seed_sd=0.01, effect=0.0)
    # Three seeds of a cell spread over 0.6-0.9 macro-F1 on the same images.
    cells["wide"] = [np.where(rng.random(y.size) < q, y, (y + 1) % K) for q in (0.6, 0.75, 0.9)]
    verdicts = stats.compare_family(y, base, cells)
    wide = verdicts["wide"]
    assert wide["outliers"] == ["wide"] and wide["method"] == stats.WELCH_METHOD and wide["df"] == 2
    values = np.array([sk_f1(y, p) for p in cells["wide"]])
    assert wide["seed_sd"] == pytest.approx(values.std(ddof=1))
    assert all(v["method"] == stats.MODERATED_METHOD for name, v in verdicts.items() if name != "wide")


@pytest.mark.parametrize("metric", ["f1_macro", "accuracy"])
def test_test_image_se_agrees_with_jackknife_and_bootstrap(metric):
    rng = np.random.default_rng(21)
    y, base, cells = simulate_family(rng, 1000, 1, 2, seed_sd=0.02, effect=0.05)
    v = stats.compare_family(y, base, cells, metric=metric)["cell 0"]
    assert v["test_se"] == pytest.approx(jackknife_se_of_difference(y, base, cells["cell 0"], metric), rel=0.02)
    reps = stats.bootstrap_replicates(y, base + cells["cell 0"], metric, n_boot=2000, seed=1)  # (4, n_boot)
    boot_sd = np.std(reps[2:].mean(axis=0) - reps[:2].mean(axis=0))
    assert v["test_se"] == pytest.approx(boot_sd, rel=0.1)  # Monte-Carlo error of an sd from 2000 draws: ~2%


def test_family_verdicts_are_deterministic_and_have_no_p_floor():
    """48 cells with a large true effect: every p far below a bootstrap's 2/(B+1), all significant after Holm."""
    rng = np.random.default_rng(22)
    y, base, cells = simulate_family(rng, 2000, 48, 3, seed_sd=0.01, effect=0.15)
    verdicts = stats.compare_family(y, base, cells)
    assert verdicts == stats.compare_family(y, base, cells)
    assert max(v["p_value"] for v in verdicts.values()) < 1e-6
    assert all(v["significant"] and v["p_holm"] < 1e-4 for v in verdicts.values())
    assert all(v["family_size"] == 48 for v in verdicts.values())


def test_holm_runs_within_the_declared_family():
    """A cell's verdict depends on its family (the mapping passed), not on what else is shown beside it."""
    rng = np.random.default_rng(23)
    y, base, cells = simulate_family(rng, 1500, 4, 3, seed_sd=0.02, effect=0.02)
    whole = stats.compare_family(y, base, cells)
    alone = stats.compare_family(y, base, {"cell 0": cells["cell 0"]})["cell 0"]
    assert alone["family_size"] == 1 and whole["cell 0"]["family_size"] == 4
    assert alone["p_holm"] == pytest.approx(alone["p_value"])
    np.testing.assert_allclose([v["p_holm"] for v in whole.values()],
                               stats.holm_bonferroni([v["p_value"] for v in whole.values()]))
    reordered = stats.compare_family(y, base, dict(reversed(cells.items())))
    for name, v in whole.items():
        assert reordered[name]["p_holm"] == pytest.approx(v["p_holm"])
        assert reordered[name]["se"] == pytest.approx(v["se"])


@pytest.mark.parametrize("seed_sd", [0.01, 0.03])
def test_seed_only_null_keeps_family_wise_error_at_alpha(seed_sd):
    """(a) No augmentation effect, models differ only by seed, 3 seeds, shared item difficulty, 20 cells.

    150 simulated families: the Monte-Carlo standard error of a rate of 0.05 is 0.018, so a
    family-wise false-positive rate above 0.05 + 2 SE would show the test is not at level 0.05.
    The same families tested on test images alone (treating trained models as fixed) flag many cells,
    so the seed variation simulated here is what the test has to absorb.
    """
    rng = np.random.default_rng(24)
    n_families, any_flag, image_only = 150, 0, []
    for _ in range(n_families):
        y, base, cells = simulate_family(rng, 2000, 20, 3, seed_sd=seed_sd, effect=0.0)
        verdicts = stats.compare_family(y, base, cells).values()
        any_flag += any(v["significant"] for v in verdicts)
        image_only.append(np.mean([2 * sps.norm.sf(abs(v["diff"]) / v["test_se"]) < 0.05 for v in verdicts]))
    mc_se = np.sqrt(0.05 * 0.95 / n_families)
    assert any_flag / n_families <= 0.05 + 2 * mc_se
    assert np.mean(image_only) > 0.2


def test_true_effect_is_found_in_every_cell_of_a_48_cell_family():
    """(b) +0.05 macro-F1 in every cell, 3 seeds, seed sd 0.01, 2,000 test images, Holm over 48 cells.

    Per-cell power over 20 families (cells are exchangeable, so the flagged share estimates each
    cell's probability); its Monte-Carlo error is the spread of the per-family share / sqrt(20).
    """
    rng = np.random.default_rng(25)
    shares, diffs = [], []
    for _ in range(20):
        y, base, cells = simulate_family(rng, 2000, 48, 3, seed_sd=0.01, effect=0.05)
        verdicts = stats.compare_family(y, base, cells).values()
        shares.append(np.mean([v["significant"] for v in verdicts]))
        diffs.append(np.mean([v["diff"] for v in verdicts]))
    assert np.mean(diffs) == pytest.approx(0.05, abs=0.01)  # the simulated effect is +0.05 macro-F1
    mc_se = np.std(shares) / np.sqrt(len(shares))
    assert np.mean(shares) - 2 * mc_se >= 0.8


def test_single_seed_cells_are_never_flagged():
    """(c) Even a 0.80 -> 0.95 jump: one seed says nothing about seed variation, so no verdict of difference."""
    rng = np.random.default_rng(26)
    for _ in range(5):
        y, base, cells = simulate_family(rng, 2000, 6, 3, seed_sd=0.02, effect=0.15)
        cells["cell 0"] = cells["cell 0"][:1]
        cells["cell 1"] = cells["cell 1"][0]  # one bare array is one seed too
        verdicts = stats.compare_family(y, base, cells)
        for name in ("cell 0", "cell 1"):
            v = verdicts[name]
            assert v["significant"] is False and v["p_value"] is None and v["p_holm"] is None
            assert v["reason"] == stats.ONE_SEED_REASON and v["n_seeds"] == 1
            # The test-image interval is still shown (normal, delta method) and here excludes 0.
            z = sps.norm.ppf(0.975)
            assert (v["low"], v["high"]) == (pytest.approx(v["diff"] - z * v["test_se"]),
                                             pytest.approx(v["diff"] + z * v["test_se"]))
            assert v["low"] > 0
        assert verdicts["cell 2"]["significant"] and verdicts["cell 3"]["significant"]
        assert all(v["family_tested"] == 4 for v in verdicts.values())
        one_base = stats.compare_family(y, base[:1], {"cell 2": cells["cell 2"]})["cell 2"]
        assert one_base["significant"] is False and one_base["reason"] == stats.ONE_BASELINE_SEED_REASON
        # A grid run with one seed everywhere (like the ResNet grid): intervals only, no seed spread known.
        single = stats.compare_family(y, base[:1], {name: preds[:1] for name, preds in cells.items() if
                                                    name != "cell 1"})
        assert not any(v["significant"] for v in single.values())
        assert all(v["family_tested"] == 0 and v["df"] is None and v["seed_sd"] is None for v in single.values())


def test_compare_groups_is_a_family_of_one():
    rng = np.random.default_rng(27)
    y, base, cells = simulate_family(rng, 1000, 1, 2, seed_sd=0.02, effect=0.05)
    assert stats.compare_groups(y, base, cells["cell 0"]) == stats.compare_family(y, base, cells)["cell 0"]


def test_compare_family_rejects_bad_inputs():
    y, pred = noisy_model(100, 0.8, seed=28)
    with pytest.raises(ValueError, match="differ in length"):
        stats.compare_family(y, [pred, pred], {"short": [pred[:50], pred[:50]]})
    with pytest.raises(ValueError, match="unknown metric"):
        stats.compare_family(y, [pred], {"a": [pred]}, metric="f1_micro")
    with pytest.raises(ConfigError, match="alpha"):
        stats.compare_family(y, [pred], {"a": [pred]}, alpha=0.0)
    assert stats.compare_family(y, [pred], {}) == {}


# ---------------------------------------------------------------------------------------------------
# Flags: at chance, still improving


def test_chance_band_covers_constant_and_random_predictors():
    rng = np.random.default_rng(29)
    y = rng.choice(K, 2000, p=np.r_[0.3, np.full(9, 0.7 / 9)])  # one frequent class, like SVHN's 1
    band = stats.chance_band(y)
    constants = [sk_f1(y, np.full(y.size, k)) for k in range(K)]
    assert band >= max(constants) and all(stats.at_chance(f, y) for f in constants)
    fresh = [sk_f1(y, rng.integers(0, K, y.size)) for _ in range(20)]
    fresh += [sk_f1(y, rng.permutation(y)) for _ in range(20)]  # random with the label frequencies
    assert sum(stats.at_chance(f, y) for f in fresh) >= 36  # a 0.99 quantile: about 1 in 100 above
    assert band < 0.15  # 10 classes: chance is about 0.1
    learned = np.where(rng.random(y.size) < 0.3, y, rng.integers(0, K, y.size))  # 30% right, the rest random
    assert not stats.at_chance(sk_f1(y, learned), y)


def test_chance_band_is_deterministic_and_grows_with_the_quantile():
    y = np.random.default_rng(30).integers(0, K, 500)
    assert stats.chance_band(y, seed=3) == stats.chance_band(y, seed=3)
    assert stats.chance_band(y, quantile=0.5) < stats.chance_band(y, quantile=0.99)
    with pytest.raises(ConfigError, match="quantile"):
        stats.chance_band(y, quantile=1.0)


@pytest.mark.parametrize(
    "history, expected",
    [
        ([0.04, 0.35, 0.64], True),  # the quick study's SimpleCNN, cut short
        ([0.80, 0.88, 0.90, 0.902], False),  # last gain 0.002: converged
        ([0.80, 0.90, 0.89], False),  # the best epoch was earlier
        ([0.80, 0.90, 0.89, 0.91], True),  # a new best by 0.01
        ([0.5], True),  # one epoch: nothing says it converged
    ],
)
def test_still_improving(history, expected):
    assert stats.still_improving(history) is expected


def test_still_improving_threshold_and_input_checks():
    assert stats.still_improving([0.8, 0.81], threshold=0.005)
    assert not stats.still_improving([0.8, 0.81], threshold=0.02)
    with pytest.raises(ConfigError, match="at least one epoch"):
        stats.still_improving([])
