"""Statistics behind every claim: metrics, intervals, seed-aware comparisons, report flags.

Metrics from a confusion matrix have their one home here (`metrics_from_confusion`, `per_class_f1`,
`macro_f1_from_confusion`); training counts the matrix and calls them.

Two sources of noise separate a measured metric from the truth:

- the finite test set: with the trained model held fixed, resample test images with replacement
  (`bootstrap_ci`, the interval every run reports);
- the training seed: mean, standard deviation and Student-t interval over runs (`seed_summary`).

A verdict that an augmentation changes a model must survive both: `compare_family` tests every cell
of a declared family (one grid of one model) against its baseline with the seed variance pooled over
the family plus the test-image variance, analytic p-values and Holm's correction within the family
(`holm_bonferroni`, `significant_flags`); `compare_groups` is the two-group case. Cells with one seed
get an interval but never a verdict. Report flags: `at_chance` (`chance_band`) and `still_improving`.
Dicts hold plain Python numbers or None (JSON-ready).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
from scipy import special
from scipy import stats as sps

from config import NUM_CLASSES, require

METRICS = ("f1_macro", "accuracy")
BOOTSTRAP_METHOD = "percentile bootstrap over test images"
# Resampled labels held at once per prediction array (int64: 32 MiB); bounds memory for any n and n_boot.
_CHUNK_ELEMENTS = 1 << 22


# ----------------------------------------------------------------------------------------------------
# Metrics from confusion matrices


def _labels(y, num_classes: int, name: str) -> np.ndarray:
    """Integer class labels as a 1-D int64 array, checked to lie in 0..num_classes-1."""
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must hold integer class labels, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        raise ValueError(f"{name} has labels outside 0..{num_classes - 1}")
    return arr


def _codes(y_true, y_pred, num_classes: int) -> np.ndarray:
    """Cell of the confusion matrix each image falls in: y_true * K + y_pred, int64 (n,)."""
    t = _labels(y_true, num_classes, "y_true")
    p = _labels(y_pred, num_classes, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.size} vs {p.size}")
    if t.size == 0:
        raise ValueError("no test images")
    return t * num_classes + p


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}")


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den is 0 (scikit-learn's zero_division=0)."""
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def per_class_f1(cm) -> np.ndarray:
    """F1 of every class from confusion matrices (..., K, K), rows = true, columns = predicted -> (..., K).

    A class with no true and no predicted image scores 0 (scikit-learn's zero_division=0).
    """
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)  # (..., K)
    # 2TP + FP + FN = (images of the class) + (images predicted as the class)
    return _ratio(2.0 * tp, cm.sum(axis=-1) + cm.sum(axis=-2))


def macro_f1_from_confusion(cm) -> np.ndarray:
    """Macro-F1 of confusion matrices (..., K, K), rows = true class, columns = predicted class.

    Same as scikit-learn's f1_score(average="macro", labels=range(K), zero_division=0): a class with
    no true and no predicted image scores 0 and still counts in the mean. Returns shape (...).
    """
    return per_class_f1(cm).mean(axis=-1)


def metrics_from_confusion(cm) -> dict:
    """Accuracy, macro/weighted and per-class precision, recall and F1, support and the matrix itself.

    cm is one (K, K) count matrix (rows = true, columns = predicted; a numpy array, nested lists or a
    CPU tensor). Same semantics as scikit-learn's precision_recall_fscore_support with
    labels=range(K) and zero_division=0: a class never predicted has precision 0, a class absent
    from the true labels has recall 0, and both count in the macro average. Plain Python numbers.
    """
    counts = np.asarray(cm)
    require(counts.ndim == 2 and counts.shape[0] == counts.shape[1],
            f"a confusion matrix must be square (K, K), got shape {counts.shape}")
    require(np.issubdtype(counts.dtype, np.integer) and bool(np.all(counts >= 0)),
            "a confusion matrix holds non-negative integer counts")
    require(counts.sum() > 0, "the confusion matrix is empty: no labels to score")
    cm64 = counts.astype(np.float64)
    tp = np.diagonal(cm64)  # (K,)
    support = cm64.sum(axis=1)  # true images per class
    precision = _ratio(tp, cm64.sum(axis=0))  # over images predicted as the class
    recall = _ratio(tp, support)
    f1 = per_class_f1(cm64)
    share = support / support.sum()  # weights of the weighted averages
    return {
        "accuracy": float(tp.sum() / support.sum()),
        "precision_macro": float(precision.mean()),
        "recall_macro": float(recall.mean()),
        "f1_macro": float(f1.mean()),
        "precision_weighted": float(precision @ share),
        "recall_weighted": float(recall @ share),
        "f1_weighted": float(f1 @ share),
        "precision_per_class": precision.tolist(),
        "recall_per_class": recall.tolist(),
        "f1_per_class": f1.tolist(),
        "support": [int(n) for n in counts.sum(axis=1)],
        "confusion_matrix": counts.astype(np.int64).tolist(),
    }


def _metric_from_confusion(cm: np.ndarray, metric: str) -> np.ndarray:
    """Metric of confusion matrices (..., K, K) -> (...)."""
    if metric == "f1_macro":
        return macro_f1_from_confusion(cm)
    return np.trace(cm, axis1=-2, axis2=-1) / cm.sum(axis=(-2, -1))


def confusion_matrices(y_true, y_pred, indices, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Confusion matrices of resampled test sets: indices (R, m) into the n images -> (R, K, K) int64.

    Row r counts the images y_true[indices[r]] against y_pred[indices[r]] (repeats count again).
    """
    codes = _codes(y_true, y_pred, num_classes)
    return _confusions_from_codes(codes, np.asarray(indices), num_classes)


def _confusions_from_codes(codes: np.ndarray, indices: np.ndarray, num_classes: int) -> np.ndarray:
    """codes (n,), indices (R, m) -> (R, K, K): one bincount over all replicates at once."""
    return _batched_confusions(codes[indices], num_classes)  # codes[indices]: (R, m), a new array


def _batched_confusions(rows: np.ndarray, num_classes: int) -> np.ndarray:
    """Confusion codes (R, m), overwritten, -> (R, K, K) counts: one bincount over all rows at once."""
    kk = num_classes * num_classes
    n_rep = rows.shape[0]
    # Row r counts into its own block of K*K bins.
    rows += (np.arange(n_rep, dtype=np.int64) * kk)[:, None]
    counts = np.bincount(rows.ravel(), minlength=n_rep * kk)
    return counts.reshape(n_rep, num_classes, num_classes)


def macro_f1(y_true, y_pred, num_classes: int = NUM_CLASSES) -> float:
    """Macro-F1 over classes 0..num_classes-1 (scikit-learn semantics, zero_division=0)."""
    return metric_value(y_true, y_pred, "f1_macro", num_classes)


def metric_value(y_true, y_pred, metric: str = "f1_macro", num_classes: int = NUM_CLASSES) -> float:
    """Macro-F1 ("f1_macro") or accuracy ("accuracy") of predictions on the whole test set."""
    _check_metric(metric)
    codes = _codes(y_true, y_pred, num_classes)
    cm = np.bincount(codes, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    return float(_metric_from_confusion(cm, metric))


# ----------------------------------------------------------------------------------------------------
# Bootstrap over test images


def _bootstrap_chunks(n: int, n_boot: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Resampling indices, (r, n) per chunk, r summing to n_boot; the draws depend only on n and seed."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    rows = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, n_boot, rows):
        yield rng.integers(0, n, size=(min(rows, n_boot - start), n))


def bootstrap_replicates(
    y_true,
    preds: Sequence,
    metric: str = "f1_macro",
    n_boot: int = 1000,
    seed: int = 0,
    num_classes: int = NUM_CLASSES,
) -> np.ndarray:
    """Metric of every prediction array on the same resampled test sets: (M, n_boot).

    `preds` holds M prediction arrays for the same images; replicate r resamples the images once and
    scores all M arrays on that resample, so differences between arrays are paired.
    """
    _check_metric(metric)
    codes = [_codes(y_true, p, num_classes) for p in preds]  # M arrays (n,)
    if not codes:
        raise ValueError("no prediction arrays")
    rng = np.random.default_rng(seed)
    chunks = [[] for _ in codes]
    for idx in _bootstrap_chunks(codes[0].size, n_boot, rng):  # idx (r, n)
        for out, c in zip(chunks, codes, strict=True):
            out.append(_metric_from_confusion(_confusions_from_codes(c, idx, num_classes), metric))
    return np.stack([np.concatenate(c) for c in chunks])


def _percentile_interval(replicates: np.ndarray, confidence: float) -> tuple[float, float]:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    low, high = np.quantile(replicates, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


def bootstrap_ci(
    y_true,
    y_pred,
    metric: str = "f1_macro",
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    num_classes: int = NUM_CLASSES,
) -> dict:
    """Confidence interval of a test metric for one trained model (test-set noise only, not seeds).

    Returns estimate (on all images), low and high (percentiles of n_boot resamples of the test
    images), n_boot, confidence, metric and method.
    """
    estimate = metric_value(y_true, y_pred, metric, num_classes)
    reps = bootstrap_replicates(y_true, [y_pred], metric, n_boot, seed, num_classes)[0]  # (n_boot,)
    low, high = _percentile_interval(reps, confidence)
    return {
        "estimate": estimate,
        "low": low,
        "high": high,
        "n_boot": int(n_boot),
        "confidence": float(confidence),
        "metric": metric,
        "method": BOOTSTRAP_METHOD,
    }


# ----------------------------------------------------------------------------------------------------
# Seeds and multiple comparisons


def _finite_values(values, name: str) -> np.ndarray:
    """A non-empty 1-D sequence of finite numbers as float64."""
    v = np.asarray(values, dtype=np.float64)
    require(v.ndim == 1 and v.size > 0, f"{name} must be a non-empty 1-D sequence, got shape {v.shape}")
    require(bool(np.all(np.isfinite(v))), f"{name} must be finite")
    return v


def seed_summary(values, confidence: float = 0.95) -> dict:
    """Spread of a metric over training seeds: mean, std (ddof=1), n and a Student-t interval.

    One value has no spread to measure: std is 0, both bounds equal the value and single_run is
    True, so a report can say so instead of carrying NaN.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"values must be a non-empty 1-D sequence, got shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError("values must be finite")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    n = v.size
    mean = float(v.mean())
    std = float(v.std(ddof=1)) if n > 1 else 0.0
    half = float(sps.t.ppf((1 + confidence) / 2, df=n - 1)) * std / np.sqrt(n) if n > 1 else 0.0
    return {
        "mean": mean,
        "std": std,
        "n": int(n),
        "ci_low": mean - half,
        "ci_high": mean + half,
        "confidence": float(confidence),
        "single_run": n == 1,
    }


def holm_bonferroni(p_values) -> np.ndarray:
    """Holm-adjusted p-values (same order as given): family-wise error control for many tests.

    The i-th smallest of m p-values is multiplied by m - i (i from 0), made non-decreasing along the
    sorted order and clipped to 1. Reject where the adjusted p-value is <= alpha.
    """
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"p_values must be 1-D, got shape {p.shape}")
    if np.any(~np.isfinite(p) | (p < 0) | (p > 1)):
        raise ValueError("p_values must lie in [0, 1]")
    m = p.size
    order = np.argsort(p, kind="stable")
    scaled = (m - np.arange(m)) * p[order]  # (m,) in ascending order of p
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return adjusted


def significant_flags(p_values, alpha: float = 0.05) -> np.ndarray:
    """Which raw p-values stay significant at family-wise level alpha after Holm's correction (bool)."""
    return holm_bonferroni(p_values) <= alpha


# ----------------------------------------------------------------------------------------------------
# Seed-aware verdicts: a family of cells against one baseline

FAMILY_METHOD = (
    "difference of seed means; each group's seed variance moderated towards a prior fitted to the family "
    "(moderated t, never below the group's own variance), except groups whose spread the prior cannot "
    "explain, which keep their own variance (Welch-style, degrees of freedom of the smaller group); plus "
    "delta-method test-image variance, which adds no degrees of freedom; Holm within the family"
)
MODERATED_METHOD = "moderated t"
WELCH_METHOD = "Welch-style (own seed variances)"
IMAGE_INTERVAL_METHOD = "no test: test-image interval only (normal, delta method)"
ONE_SEED_REASON = "one seed: seed variation unknown"
ONE_BASELINE_SEED_REASON = "baseline has one seed: seed variation unknown"
# A group whose seed variance lies above this upper quantile of what the family's prior predicts keeps
# its own variance. 0.02: a 3-seed group 8x wider than the rest escapes the flag ~6% of the time (and
# then keeps at least its own variance), a group of the ordinary spread is flagged ~2% of the time (it
# loses its shrinkage, not its test). Chosen with the simulation of benchmarks/family_tests.py.
OUTLIER_LEVEL = 0.02
# Fewer groups than this leave the prior's spread unmeasurable: every group keeps its own variance.
MIN_PRIOR_GROUPS = 4
# The first, robust look at a family's spread reads this quantile of its groups' variances.
ROBUST_QUANTILE = 0.25
# One group may be wide and flagged on its own; when the rest still differ in spread (their mean variance
# over their median beyond its WIDESPREAD_LEVEL upper quantile under equal spread), none shares a prior.
WIDESPREAD_LEVEL = 0.01
# Groups whose variances Bartlett's test does not tell apart at this level are pooled outright.
HOMOGENEITY_LEVEL = 0.01
_VARIANCE_FLOOR = 1e-12  # log of a zero variance (identical seeds) stays finite


def _trigamma_inverse(y: np.ndarray) -> np.ndarray:
    """x with trigamma(x) = y (y > 0), by Newton's method from x = 0.5 + 1/y (Smyth 2004, limma)."""
    x = 0.5 + 1.0 / y
    for _ in range(50):
        tri = special.polygamma(1, x)
        step = tri * (1.0 - tri / y) / special.polygamma(2, x)
        x = x + step
        if np.all(-step / x < 1e-8):
            break
    return x


def _bartlett_p(variances: np.ndarray, dfs: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Bartlett's test that the masked groups (..., G) share one variance: its p-value (...)."""
    d = np.where(mask, dfs, 0.0)
    total = d.sum(axis=-1)
    k = mask.sum(axis=-1)
    log_var = np.log(np.maximum(variances, _VARIANCE_FLOOR))
    pooled = np.maximum((d * np.where(mask, variances, 0.0)).sum(axis=-1) / np.maximum(total, 1.0), _VARIANCE_FLOOR)
    statistic = total * np.log(pooled) - (d * np.where(mask, log_var, 0.0)).sum(axis=-1)
    inverse = np.where(mask, 1.0 / np.maximum(dfs, 1.0), 0.0).sum(axis=-1)
    statistic /= 1 + (inverse - 1 / np.maximum(total, 1.0)) / (3 * np.maximum(k - 1, 1))
    return np.where(k >= 2, sps.chi2.sf(statistic, np.maximum(k - 1, 1)), 1.0)


def _fit_variance_prior(variances: np.ndarray, dfs: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scaled inverse-chi-square prior (s0^2, d0) of the masked groups' variances (..., G) -> (...), (...).

    Groups that pass Bartlett's test of equal variance (at HOMOGENEITY_LEVEL) share their pooled
    variance with d0 = their total degrees of freedom: with 2 degrees of freedom per group, Smyth's
    moment estimate of d0 is too noisy to be worth its loss of power when spread is equal. Otherwise
    Smyth's (2004) moments of log-variances: the excess of their spread over what d_g degrees of
    freedom alone give sets d0, capped at the groups' total degrees of freedom.
    """
    half = np.where(mask, dfs, 2.0) / 2  # placeholder 1 where masked out keeps digamma finite
    count = np.maximum(mask.sum(axis=-1), 1)
    total_df = np.where(mask, dfs, 0.0).sum(axis=-1)
    e = np.log(np.maximum(variances, _VARIANCE_FLOOR)) - special.digamma(half) + np.log(half)
    e_mean = np.where(mask, e, 0.0).sum(axis=-1) / count
    spread = np.where(mask, (e - e_mean[..., None]) ** 2, 0.0).sum(axis=-1) / np.maximum(count - 1, 1)
    excess = spread - np.where(mask, special.polygamma(1, half), 0.0).sum(axis=-1) / count
    d0 = np.minimum(np.where(excess > 0, 2 * _trigamma_inverse(np.maximum(excess, 1e-12)), np.inf), total_df)
    finite_half = np.where(np.isfinite(d0) & (d0 > 0), d0, 1.0) / 2
    correction = np.where(np.isfinite(d0), special.digamma(finite_half) - np.log(finite_half), 0.0)
    smyth_var = np.exp(e_mean + correction)
    pooled_var = (np.where(mask, dfs * variances, 0.0)).sum(axis=-1) / np.maximum(total_df, 1.0)
    equal = _bartlett_p(variances, dfs, mask) >= HOMOGENEITY_LEVEL
    return np.where(equal, pooled_var, smyth_var), np.where(equal, total_df, d0)


def _mean_over_median(variances: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean over median of the masked groups' variances (..., G) -> (...): large when some of them are
    much wider than the rest, and scale-free, so its null distribution needs no variance."""
    with np.errstate(all="ignore"):
        kept = np.where(mask, variances, np.nan)
        return np.nanmean(kept, axis=-1) / np.maximum(np.nanmedian(kept, axis=-1), _VARIANCE_FLOOR)


def _all_but_widest(variances: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """valid minus its widest group, (..., G) bool."""
    rank = np.argsort(np.argsort(np.where(valid, -variances, np.inf), axis=-1), axis=-1)  # 0 = widest
    return valid & (rank >= 1)


@functools.lru_cache(maxsize=32)
def _spread_null_quantile(dfs: tuple, quantile: float) -> float:
    """The `quantile` of _mean_over_median over all groups but the widest when every group has the same
    variance (groups of these degrees of freedom; a fixed Monte-Carlo of 20,000 families: deterministic)."""
    d = np.array(dfs, dtype=np.float64)
    draws = np.random.default_rng(0).chisquare(d, size=(20000, d.size)) / d  # (20000, G)
    return float(np.quantile(_mean_over_median(draws, _all_but_widest(draws, np.ones(draws.shape, bool))), quantile))


def moderated_variances(variances, counts, level: float = OUTLIER_LEVEL) -> dict:
    """Seed variances of the groups of many families, moderated where the family shares a prior.

    variances (..., G) (ddof=1, any value where a group has one seed), counts (G,) seeds per group.
    The prior is fitted to the groups with >= 2 seeds (first flagged against a robust reference: the
    lower quartile of the variances), then refitted without the groups whose variance lies above its
    upper `level` quantile (F(d_g, d0)), until the flags settle. An unflagged group gets the larger of
    its own s_g^2 and (d0 s0^2 + d_g s_g^2) / (d0 + d_g), with d0 + d_g degrees of freedom; a flagged
    one keeps its own s_g^2 with d_g. No group shares the prior when
    fewer than MIN_PRIOR_GROUPS remain to fit it, or when the groups but the widest still differ in
    spread (mean over median of their variances beyond what equal spread gives at WIDESPREAD_LEVEL).
    Returns arrays: variance, df, outlier (..., G); shared, prior_var, prior_df (...).
    """
    variances = np.asarray(variances, dtype=np.float64)
    counts = np.asarray(counts)
    dfs = np.broadcast_to(counts - 1.0, variances.shape)
    valid = np.broadcast_to(counts >= 2, variances.shape)
    d = np.maximum(dfs, 1.0)
    # Robust start: as if every group shared the variance the narrower ones (the lower quartile) show.
    scaled = np.where(valid, variances * d / sps.chi2.ppf(ROBUST_QUANTILE, d), np.nan)
    with warnings.catch_warnings():  # a family of one-seed groups has no variance to read: no flag
        warnings.simplefilter("ignore", RuntimeWarning)
        reference = np.maximum(np.nanquantile(scaled, ROBUST_QUANTILE, axis=-1), _VARIANCE_FLOOR)[..., None]
    outlier = valid & (sps.chi2.sf(d * variances / reference, d) < level)
    for _ in range(10):
        prior_var, prior_df = _fit_variance_prior(variances, dfs, valid & ~outlier)
        ratio = np.divide(variances, prior_var[..., None], out=np.zeros_like(variances),
                          where=prior_var[..., None] > 0)
        flagged = valid & (sps.f.sf(ratio, d, np.maximum(prior_df, 1.0)[..., None]) < level)
        if np.array_equal(flagged, outlier):
            break
        outlier = flagged
    # The widest group set aside, do the rest still differ in spread? Then spread is unequal across the
    # family at large, and a shared prior would understate the wide groups the flags miss: none is shared.
    valid_dfs = tuple(float(x) for x in (counts[counts >= 2] - 1))
    widespread = np.zeros(variances.shape[:-1], dtype=bool)
    if len(valid_dfs) >= MIN_PRIOR_GROUPS:
        spread = _mean_over_median(variances, _all_but_widest(variances, valid))
        widespread = spread > _spread_null_quantile(valid_dfs, 1 - WIDESPREAD_LEVEL)
    shared = ((valid & ~outlier).sum(axis=-1) >= MIN_PRIOR_GROUPS) & ~widespread
    moderate = shared[..., None] & valid & ~outlier
    d0 = prior_df[..., None]
    # Shrunk towards the prior, never below the group's own variance: a wide group whose 3 seeds happened
    # to agree (and so escaped the flag) keeps what its seeds show.
    pooled = (d0 * prior_var[..., None] + dfs * variances) / np.maximum(d0 + dfs, 1.0)
    return {"variance": np.where(moderate, np.maximum(pooled, variances), np.where(valid, variances, np.nan)),
            "df": np.where(moderate, d0 + dfs, np.where(valid, dfs, 0.0)), "outlier": outlier & shared[..., None],
            "shared": shared, "prior_var": prior_var, "prior_df": prior_df}


def _holm_rows(p_values: np.ndarray) -> np.ndarray:
    """holm_bonferroni along the last axis of (..., m)."""
    m = p_values.shape[-1]
    order = np.argsort(p_values, axis=-1, kind="stable")
    scaled = (m - np.arange(m)) * np.take_along_axis(p_values, order, axis=-1)
    adjusted = np.empty_like(p_values)
    np.put_along_axis(adjusted, order, np.minimum(np.maximum.accumulate(scaled, axis=-1), 1.0), axis=-1)
    return adjusted


def family_tests(means, variances, counts, test_var, *, alpha: float = 0.05, confidence: float = 0.95,
                 level: float = OUTLIER_LEVEL) -> dict:
    """Vectorized core of compare_family: every cell of many families against its baseline (group 0).

    means, variances (..., G) per-seed means and variances (ddof=1) of the baseline then C = G - 1 cells,
    counts (G,) seeds per group, test_var (..., C) test-image variance of each cell's difference.
    se^2 = v_cell / n_cell + v_base / n_base + test_var with v the moderated_variances; the test's df is
    the smaller of the two groups' (Hsu's conservative Welch df: never the Satterthwaite estimate, whose
    noise at Holm's small levels is anti-conservative), and the known test-image term adds none.
    Holm over the tested cells (both sides with >= 2 seeds) of each family.
    Returns arrays (..., C): diff, se, df, p_value, p_holm, significant, low, high (interval of diff;
    NaN where untested), and moderated_variances' arrays; tested (C,).
    """
    means = np.asarray(means, dtype=np.float64)
    counts = np.asarray(counts)
    moderated = moderated_variances(variances, counts, level)
    var, df = moderated["variance"], moderated["df"]
    diff = means[..., 1:] - means[..., :1]
    se = np.sqrt(var[..., 1:] / counts[1:] + var[..., :1] / counts[0] + np.asarray(test_var, dtype=np.float64))
    test_df = np.minimum(df[..., 1:], df[..., :1])
    tested = (counts[1:] >= 2) & (counts[0] >= 2)
    # se = 0 only when nothing varies: diff 0 gives p = 1, any other diff p = 0.
    t = np.divide(np.abs(diff), se, out=np.where(np.abs(diff) > 0, np.inf, 0.0), where=se > 0)
    p_value = np.where(tested, np.minimum(2 * sps.t.sf(t, np.maximum(test_df, 1.0)), 1.0), np.nan)
    p_holm = np.full_like(p_value, np.nan)
    p_holm[..., tested] = _holm_rows(p_value[..., tested])
    half = sps.t.ppf((1 + confidence) / 2, np.maximum(test_df, 1.0)) * se
    return moderated | {"diff": diff, "se": se, "df": np.where(tested, test_df, np.nan), "p_value": p_value,
                        "p_holm": p_holm, "significant": tested & (p_holm <= alpha),
                        "low": np.where(tested, diff - half, np.nan), "high": np.where(tested, diff + half, np.nan),
                        "tested": tested}


def _influence_tables(cms: np.ndarray, metric: str) -> np.ndarray:
    """Per-image influence of the metric, by confusion cell: cms (S, K, K) -> (S, K*K).

    A metric T of a model is a smooth function of its confusion matrix; moving one image from the
    test set's empirical distribution changes T by table[y * K + p] / n to first order (the delta
    method). For accuracy the table is 1{y == p} - accuracy. For macro-F1 with a_k = (true + predicted
    images of class k) / n, F1_k = 2 TP_k / (n a_k): an image right in class k adds 2 (1 - F1_k) / a_k,
    an image of class k predicted as j adds -F1_k / a_k - F1_j / a_j, each divided by K. Each table
    has mean zero over the test images.
    """
    n_seeds, k, _ = cms.shape
    n = cms.sum(axis=(1, 2))[:, None, None]  # (S, 1, 1)
    if metric == "accuracy":
        acc = np.trace(cms, axis1=1, axis2=2)[:, None, None] / n
        return (np.eye(k)[None] - acc).reshape(n_seeds, k * k)
    share = (cms.sum(axis=2) + cms.sum(axis=1)) / n[:, 0]  # a_k, (S, K)
    f1_over_share = _ratio(per_class_f1(cms), share)  # (S, K); classes with a_k = 0 never occur
    table = -(f1_over_share[:, :, None] + f1_over_share[:, None, :])  # (S, K_true, K_pred)
    diagonal = 2.0 * _ratio(1.0 - per_class_f1(cms), share)  # (S, K)
    table[:, np.arange(k), np.arange(k)] = diagonal
    return table.reshape(n_seeds, k * k) / k


def _prediction_stack(preds, name: str) -> np.ndarray:
    """A list of per-seed prediction arrays (or one array) as (S, n)."""
    stack = np.atleast_2d(np.asarray(preds))
    if stack.ndim != 2 or stack.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty list of equally long prediction arrays")
    return stack


def _seed_codes(labels: np.ndarray, preds, num_classes: int, name: str) -> np.ndarray:
    """Per-seed prediction arrays (a list, or one array for one seed) -> confusion codes (S, n)."""
    stack = _prediction_stack(preds, name)  # (S, n)
    if stack.shape[1] != labels.size:
        raise ValueError(f"{name}: y_true and y_pred differ in length: {labels.size} vs {stack.shape[1]}")
    return labels * num_classes + _labels(stack.ravel(), num_classes, name).reshape(stack.shape)


def _seed_groups(y_true, groups: list, metric: str, num_classes: int, names: list[str]) -> list[tuple]:
    """For each group of per-seed predictions: (metric of each seed (S,), influence of their mean (n,)).

    All models are scored in one pass: one batched confusion count and one influence lookup.
    """
    labels = _labels(y_true, num_classes, "y_true")
    require(labels.size > 0, "no test images")
    codes = [_seed_codes(labels, preds, num_classes, name) for preds, name in zip(groups, names, strict=True)]
    stacked = np.concatenate(codes)  # (M, n), M = all seeds of all groups
    cms = _batched_confusions(stacked.copy(), num_classes)  # (M, K, K)
    values = _metric_from_confusion(cms, metric)  # (M,)
    influence = np.take_along_axis(_influence_tables(cms, metric), stacked, axis=1)  # (M, n)
    bounds = np.cumsum([c.shape[0] for c in codes])[:-1]
    return [(v, i.mean(axis=0)) for v, i in zip(np.split(values, bounds), np.split(influence, bounds), strict=True)]


def _group_arrays(base, scored) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-seed values and mean influences of the baseline and the cells -> means (G,), variances (G,)
    (ddof=1, 0 for one seed), counts (G,) and the test-image variance of each cell's difference (C,)."""
    groups = [base, *scored]
    means = np.array([values.mean() for values, _ in groups])
    variances = np.array([values.var(ddof=1) if values.size > 1 else 0.0 for values, _ in groups])
    counts = np.array([values.size for values, _ in groups])
    n = base[1].size
    test_var = np.array([np.sum((influence - base[1]) ** 2) / n**2 for _, influence in scored])
    return means, variances, counts, test_var


def _verdict(tests: dict, c: int, counts: np.ndarray, crit: float) -> dict:
    """Cell c's verdict from family_tests' arrays (F = 1); untested (with a reason) when either side has
    one seed: then the interval is the test-image one (normal, delta method)."""
    diff, test_se = float(tests["diff"][c]), float(np.sqrt(tests["test_var"][c]))
    own = [bool(tests["outlier"][g]) or not bool(tests["shared"]) for g in (0, c + 1)]
    verdict = {"diff": diff, "cell_mean": float(tests["means"][c + 1]), "baseline_mean": float(tests["means"][0]),
               "n_seeds": int(counts[c + 1]), "n_baseline_seeds": int(counts[0]), "test_se": test_se,
               "reason": None, "p_value": None, "p_holm": None, "significant": False, "df": None,
               "seed_sd": None, "baseline_seed_sd": None, "method": None}
    if not tests["tested"][c]:
        reason = ONE_SEED_REASON if counts[c + 1] < 2 else ONE_BASELINE_SEED_REASON
        return verdict | {"low": diff - crit * test_se, "high": diff + crit * test_se, "se": test_se, "reason": reason,
                          "method": IMAGE_INTERVAL_METHOD}
    return verdict | {
        "low": float(tests["low"][c]), "high": float(tests["high"][c]), "se": float(tests["se"][c]),
        "p_value": float(tests["p_value"][c]), "p_holm": float(tests["p_holm"][c]),
        "significant": bool(tests["significant"][c]), "df": float(tests["df"][c]),
        "seed_sd": float(np.sqrt(tests["variance"][c + 1])), "baseline_seed_sd": float(np.sqrt(tests["variance"][0])),
        "method": WELCH_METHOD if any(own) else MODERATED_METHOD,
    }


def compare_family(
    y_true,
    baseline_preds,
    cells: Mapping[str, Sequence],
    *,
    metric: str = "f1_macro",
    alpha: float = 0.05,
    confidence: float = 0.95,
    num_classes: int = NUM_CLASSES,
    outlier_level: float = OUTLIER_LEVEL,
) -> dict[str, dict]:
    """Which cells of a declared family differ from their baseline, given training seeds AND test images?

    baseline_preds and each cells[name] hold one prediction array per training seed, all on the same
    test images y_true. For a cell with values c_1..c_Sc (one per seed) and a baseline with b_1..b_Sb:

    - diff = mean(c) - mean(b);
    - seed variances: each group's own (ddof=1) moderated by empirical Bayes (Smyth 2004): shrunk towards
      a prior fitted to the family's groups, except groups whose spread that prior cannot explain
      (moderated_variances: the prior is refitted without them; they keep their own variance and degrees
      of freedom). Spread can differ between cells (strong augmentation at a short budget spreads seeds
      far more than the baseline): a pooled variance would understate a wide cell's standard error;
    - test-image variance v: delta-method (influence-function) variance of the difference of
      seed-mean metrics over resampled test images, with the trained models fixed. It is analytic
      and deterministic, and agrees with the bootstrap and jackknife;
    - t = diff / sqrt(s_c^2 / Sc + s_b^2 / Sb + v), Student t with the smaller of the two groups'
      degrees of freedom (v, being known, adds none); two-sided p (family_tests).

    Analytic rather than a two-level bootstrap: its p-values have no floor (a bootstrap p cannot go
    below about 2/(B+1), and Holm over 48 cells multiplies that floor by 48). Conservative in two places:
    the per-seed values already carry each model's own test-image noise, which v counts again, and seeds
    are treated as unpaired.

    Holm's correction runs over the tested cells of this family: the family is the mapping passed in,
    so a cell's verdict is the same wherever that family is shown. A cell or baseline with one seed
    is never tested: its verdict carries the test-image interval (normal, delta method), p_value,
    p_holm and df None, significant False and a reason. No randomness: same inputs, same verdicts.

    Returns {cell name: verdict}; each verdict has diff, low, high (confidence interval of diff),
    se, test_se, p_value, p_holm, significant, cell_mean, baseline_mean, n_seeds, n_baseline_seeds,
    reason (None or why untested), df (the test's), seed_sd and baseline_seed_sd (the variances used),
    method (MODERATED_METHOD, WELCH_METHOD where either side keeps its own variance, or
    IMAGE_INTERVAL_METHOD where untested), and for the
    family: outliers (names of the groups that keep their own variance, "baseline" included),
    shared_prior (whether any group was moderated), prior_sd and prior_df, family_size (cells passed),
    family_tested (cells in Holm's correction), alpha, confidence, metric and family_method.
    """
    _check_metric(metric)
    require(0.0 < alpha < 1.0, f"alpha must lie in (0, 1), got {alpha}")
    require(0.0 < confidence < 1.0, f"confidence must lie in (0, 1), got {confidence}")
    require(0.0 <= outlier_level < 1.0, f"outlier_level must lie in [0, 1), got {outlier_level}")
    names = list(cells)
    base, *scored = _seed_groups(y_true, [baseline_preds, *cells.values()], metric, num_classes,
                                 ["baseline_preds", *(f"cells[{name!r}]" for name in names)])
    means, variances, counts, test_var = _group_arrays(base, scored)
    tests = family_tests(means, variances, counts, test_var, alpha=alpha, confidence=confidence, level=outlier_level)
    tests |= {"means": means, "test_var": test_var}
    crit = float(sps.norm.ppf((1 + confidence) / 2))
    verdicts = {name: _verdict(tests, c, counts, crit) for c, name in enumerate(names)}
    shared = bool(tests["shared"])
    outliers = [name for name, flag in zip(["baseline", *names], tests["outlier"], strict=True) if flag]
    family = {"outliers": outliers, "shared_prior": shared,
              "prior_sd": float(np.sqrt(tests["prior_var"])) if shared else None,
              "prior_df": float(tests["prior_df"]) if shared else None, "family_size": len(cells),
              "family_tested": int(np.sum(tests["tested"])), "alpha": float(alpha), "confidence": float(confidence),
              "metric": metric, "family_method": FAMILY_METHOD}
    for verdict in verdicts.values():
        verdict.update(family)
    return verdicts


def compare_groups(y_true, preds_a, preds_b, **options) -> dict:
    """Does group b (one prediction array per seed) differ from group a on the same test images?

    A family of one: compare_family(y_true, preds_a, {"b": preds_b}, **options)["b"], so diff is
    mean(b) - mean(a) and the seed variance is pooled over the two groups.
    """
    return compare_family(y_true, preds_a, {"b": preds_b}, **options)["b"]


# ----------------------------------------------------------------------------------------------------
# A cell's own interval: seeds and test images

SEEDS_AND_IMAGES = "seeds and test images"
IMAGES_ONLY = "test images only (one seed: seed noise not included)"


def cell_estimate(y_true, preds, *, metric: str = "f1_macro", confidence: float = 0.95,
                  num_classes: int = NUM_CLASSES) -> dict:
    """Mean metric of a cell's seeds with an interval for what a new seed on new test images would average.

    preds holds one prediction array per training seed on the same test images. With 2+ seeds: mean
    +- t(n - 1) * sqrt(s^2 / n + v), s^2 the variance over seeds and v the delta-method test-image
    variance of the seed mean (the seeds share one test set, so a t-interval over seeds alone misses
    how that test set itself fell); kind SEEDS_AND_IMAGES. With one seed: the normal test-image
    interval, which says nothing about seed noise; kind IMAGES_ONLY. Returns mean, low, high, n,
    seed_sd (None for one seed), test_se, df (None for one seed), confidence, metric and kind.
    """
    _check_metric(metric)
    require(0.0 < confidence < 1.0, f"confidence must lie in (0, 1), got {confidence}")
    [(values, influence)] = _seed_groups(y_true, [preds], metric, num_classes, ["preds"])
    n, mean = values.size, float(values.mean())
    test_var = float(np.sum(influence**2)) / influence.size**2
    out = {"mean": mean, "n": int(n), "test_se": float(np.sqrt(test_var)), "confidence": float(confidence),
           "metric": metric}
    if n == 1:
        half = float(sps.norm.ppf((1 + confidence) / 2)) * np.sqrt(test_var)
        return out | {"low": mean - half, "high": mean + half, "seed_sd": None, "df": None, "kind": IMAGES_ONLY}
    seed_var = float(values.var(ddof=1))
    half = float(sps.t.ppf((1 + confidence) / 2, n - 1)) * np.sqrt(seed_var / n + test_var)
    return out | {"low": mean - half, "high": mean + half, "seed_sd": float(np.sqrt(seed_var)), "df": n - 1,
                  "kind": SEEDS_AND_IMAGES}


# ----------------------------------------------------------------------------------------------------
# Seeds a cell needs: an internal pilot that reads variances only


def _seed_term_df(var_cell, n_cell, var_base, n_base):
    """Welch-Satterthwaite degrees of freedom of var_cell / n_cell + var_base / n_base (arrays broadcast).

    Each variance counts with its own seeds - 1 degrees of freedom; where both are 0 the term has none
    to estimate and the df is that of the larger group (any finite value gives the same answer).
    """
    a, b = var_cell / n_cell, var_base / n_base
    num = (a + b) ** 2
    den = a**2 / np.maximum(n_cell - 1, 1) + b**2 / np.maximum(n_base - 1, 1)
    fallback = np.maximum(n_cell, n_base) - 1.0
    return np.divide(num, den, out=np.broadcast_to(fallback, np.shape(num)).astype(np.float64), where=den > 0)


def seeds_needed(var_cell, n_cell, var_base, n_base, *, min_effect, family_size, alpha, power, seeds_max,
                 test_var=0.0, baseline_seeds=None):
    """Vectorized core of seeds_for_effect: arrays of variances and counts broadcast -> seeds (int array).

    baseline_seeds None: the baseline grows with the cell (max of its count and the cell's).
    """
    n_cell = np.asarray(n_cell, dtype=np.int64)
    candidates = np.arange(1, max(int(seeds_max), int(np.max(n_cell))) + 1)  # (N,)
    shape = np.broadcast_shapes(np.shape(var_cell), np.shape(n_cell), np.shape(var_base), np.shape(n_base),
                                np.shape(test_var))
    n = candidates.reshape((-1,) + (1,) * len(shape)).astype(np.float64)  # (N, 1, ...)
    n_b = np.maximum(n_base, n) if baseline_seeds is None else np.broadcast_to(baseline_seeds, n.shape)
    seed_var = var_cell / n + var_base / n_b
    se = np.sqrt(seed_var + test_var)
    # The seed term's df only: the known test-image variance never adds degrees of freedom.
    df = np.maximum(_seed_term_df(var_cell, n, var_base, n_b), 1.0)
    crit = sps.t.ppf(1 - alpha / (2 * family_size), df)  # Bonferroni: Holm's first, strictest step
    ncp = np.divide(min_effect, se, out=np.full(se.shape, np.inf), where=se > 0)
    reached = (sps.nct.sf(crit, df, np.minimum(ncp, 1e6)) >= power) & (n >= n_cell)
    reached |= n == candidates[-1]  # the cap: as many as allowed when no count reaches the power
    first = np.argmax(reached, axis=0)  # index of the smallest count that reaches it
    return np.maximum(candidates[first], n_cell)


def seeds_for_effect(
    cell_values,
    baseline_values,
    *,
    min_effect: float = 0.02,
    family_size: int = 1,
    alpha: float = 0.05,
    power: float = 0.8,
    seeds_max: int = 8,
    test_se: float = 0.0,
    baseline_seeds: int | None = None,
) -> int:
    """How many seeds in all a cell needs to detect a difference of min_effect from its baseline.

    An internal pilot (Wittes and Brittain 1990; Kieser and Friede 2003): after the first seeds, the
    seed count is re-estimated from the seed variances of the cell and of the baseline alone, never
    from their difference, so looking does not raise the false-positive rate. The count n is the
    smallest with power >= `power` for a two-sided Welch t test of a true difference min_effect at
    level alpha / family_size (Holm's first step, the strictest), standard error
    sqrt(s_cell^2 / n + s_base^2 / n_base + test_se^2) and the Satterthwaite degrees of freedom of the
    seed term alone (the test-image variance is known, it adds none). The test-image standard error
    of the difference is held fixed: more seeds shrink only its seed-specific part, so this errs
    towards more seeds.

    n_base is baseline_seeds when given, else max(current baseline seeds, n): the baseline is topped up
    alongside its cells, so give it the largest count any cell of its family needs. The answer lies
    between the cell's current seed count and seeds_max (the current count when that is already
    larger); seeds_max when no count up to the cap reaches the power.
    """
    cell = _finite_values(cell_values, "cell_values")
    base = _finite_values(baseline_values, "baseline_values")
    require(cell.size >= 2 and base.size >= 2, "seeds_for_effect needs at least 2 seeds of the cell and of the "
            "baseline to estimate their seed variance; run more seeds first")
    require(min_effect > 0, f"min_effect must be > 0, got {min_effect}")
    require(family_size >= 1, f"family_size must be >= 1, got {family_size}")
    require(0.0 < alpha < 1.0 and 0.0 < power < 1.0, f"alpha and power must lie in (0, 1), got {alpha}, {power}")
    require(seeds_max >= 2, f"seeds_max must be >= 2, got {seeds_max}")
    require(test_se >= 0 and np.isfinite(test_se), f"test_se must be a finite number >= 0, got {test_se}")
    require(baseline_seeds is None or baseline_seeds >= base.size,
            f"baseline_seeds must be at least the baseline's {base.size} seeds, got {baseline_seeds}")
    return int(seeds_needed(float(cell.var(ddof=1)), cell.size, float(base.var(ddof=1)), base.size,
                            min_effect=min_effect, family_size=family_size, alpha=alpha, power=power,
                            seeds_max=seeds_max, test_var=test_se**2, baseline_seeds=baseline_seeds))


# ----------------------------------------------------------------------------------------------------
# Flags for reports: at chance, still improving

# Still improving: validation macro-F1's trend over the last epochs (the last half, at least
# TREND_MIN_EPOCHS) rises beyond the run's own epoch-to-epoch noise (one-sided t test of the
# least-squares slope at STILL_IMPROVING_LEVEL, noise from the residuals about the line). Runs with
# fewer epochs use the last epoch's gain over the best earlier one against STILL_IMPROVING_GAIN.
TREND_MIN_EPOCHS = 5
STILL_IMPROVING_LEVEL = 0.05
STILL_IMPROVING_GAIN = 0.005
# A learning rate that ends below this share of its largest value over the last epochs is annealing:
# the rise it brings (one-cycle, cosine) is the schedule finishing, not a budget cut short.
ANNEALED_SHARE = 0.5


def _random_predictor_f1(labels: np.ndarray, draw, n_sim: int, num_classes: int) -> np.ndarray:
    """Macro-F1 of n_sim predictors, draw(rows) -> predictions (rows, n), against labels (n,)."""
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // labels.size)
    scores = []
    for start in range(0, n_sim, rows_per_chunk):
        preds = draw(min(rows_per_chunk, n_sim - start))  # (rows, n)
        scores.append(macro_f1_from_confusion(_batched_confusions(labels * num_classes + preds, num_classes)))
    return np.concatenate(scores)


def chance_band(
    y_true, *, seed: int = 0, quantile: float = 0.99, n_sim: int = 200, num_classes: int = NUM_CLASSES
) -> float:
    """Highest macro-F1 a predictor that ignores the images reaches on these test labels.

    The maximum of: every constant predictor (exact), and the `quantile` over n_sim simulations of
    predictors drawing classes uniformly or with the test set's label frequencies. A model at or
    below this value has learned nothing measurable. Deterministic given seed; the last few bands
    are kept, so scoring every row of a table against one test set simulates once.
    """
    labels = _labels(y_true, num_classes, "y_true")
    require(labels.size > 0, "chance_band needs test labels")
    require(0.0 < quantile < 1.0, f"quantile must lie in (0, 1), got {quantile}")
    require(n_sim >= 1, f"n_sim must be >= 1, got {n_sim}")
    return _chance_band(labels.tobytes(), seed, quantile, n_sim, num_classes)


@functools.lru_cache(maxsize=8)
def _chance_band(label_bytes: bytes, seed: int, quantile: float, n_sim: int, num_classes: int) -> float:
    labels = np.frombuffer(label_bytes, dtype=np.int64)
    rng = np.random.default_rng(seed)
    n = labels.size
    support = np.bincount(labels, minlength=num_classes).astype(np.float64)  # (K,)
    # Always predicting class k: F1_k = 2 N_k / (N_k + n), every other class 0.
    constant = float(np.max(2 * support / (support + n))) / num_classes
    frequencies = support / n
    uniform = _random_predictor_f1(labels, lambda r: rng.integers(0, num_classes, (r, n)), n_sim, num_classes)
    matched = _random_predictor_f1(labels, lambda r: rng.choice(num_classes, (r, n), p=frequencies),
                                   n_sim, num_classes)
    return max(constant, float(np.quantile(uniform, quantile)), float(np.quantile(matched, quantile)))


def at_chance(f1: float, y_true, *, low: float | None = None, **options) -> bool:
    """Is this macro-F1 not distinguishable from chance on these test labels?

    True when the estimate, or the lower end `low` of its interval when given, lies within the chance
    band (chance_band; options go to it): a cell whose interval reaches the band may have learned
    nothing, and is never to be named best or most robust.
    """
    judged = f1 if low is None else min(f1, low)
    return bool(judged <= chance_band(y_true, **options))


def still_improving(val_f1_history: Sequence[float], threshold: float = STILL_IMPROVING_GAIN, *,
                    lrs: Sequence[float] | None = None) -> bool:
    """Was validation macro-F1 still rising over the last epochs, beyond the run's own noise?

    With TREND_MIN_EPOCHS or more epochs: the least-squares slope over the last half of the epochs
    (at least TREND_MIN_EPOCHS) is tested against the scatter of those epochs about their line
    (one-sided t, level STILL_IMPROVING_LEVEL). lrs, the learning rate of each epoch (the history's
    "lr"), makes the flag aware of the schedule: when the rate falls below ANNEALED_SHARE of its
    largest value over those epochs, the rise is the annealing's and the run is not flagged. Fewer
    epochs: the last epoch beats the best earlier one by more than threshold; one epoch: True
    (nothing says it converged).
    """
    history = np.asarray(val_f1_history, dtype=np.float64)
    require(history.ndim == 1 and history.size > 0, "still_improving needs at least one epoch's validation F1")
    require(bool(np.all(np.isfinite(history))), "validation F1 values must be finite")
    require(lrs is None or len(lrs) == history.size,
            f"lrs must give one learning rate per epoch ({history.size}), got {None if lrs is None else len(lrs)}")
    if history.size == 1:
        return True
    if history.size < TREND_MIN_EPOCHS:
        return bool(history[-1] - history[:-1].max() > threshold)
    window = max(TREND_MIN_EPOCHS, history.size // 2)
    if lrs is not None:
        recent = np.asarray(lrs, dtype=np.float64)[-window:]
        if recent[-1] < ANNEALED_SHARE * recent.max():
            return False
    return bool(trend_t(history[-window:]) > sps.t.ppf(1 - STILL_IMPROVING_LEVEL, window - 2))


def trend_t(values) -> np.ndarray:
    """t statistic of the least-squares slope of values (..., k) against 0, 1, .., k-1 (k >= 3) -> (...).

    Residual scatter about the line estimates the noise (k - 2 degrees of freedom); a perfectly straight
    rise is +inf, a flat line 0.
    """
    y = np.asarray(values, dtype=np.float64)
    k = y.shape[-1]
    x = np.arange(k) - (k - 1) / 2
    sxx = float(np.sum(x**2))
    slope = (y @ x) / sxx
    residuals = y - y.mean(axis=-1, keepdims=True) - slope[..., None] * x
    se = np.sqrt(np.sum(residuals**2, axis=-1) / (k - 2) / sxx)
    return np.divide(slope, se, out=np.where(slope > 0, np.inf, np.where(slope < 0, -np.inf, 0.0)), where=se > 1e-15)


def format_estimate(est: float, low: float, high: float, digits: int = 3) -> str:
    """An estimate with its interval, e.g. "0.912 [0.905, 0.918]"."""
    return f"{est:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"
