"""Seeds where they are needed: the grid's internal-pilot top-up (pipeline.TopUp), simulated with the
library's own planning (pipeline.family_seed_counts) and verdicts (stats.compare_family)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

import pipeline
import stats
from config import ConfigError

K = 10
N_IMAGES = 2000
FIRST_SEEDS = 3
SEED_SD = 0.01  # spread of accuracy between training seeds of the baseline and of a narrow cell
N_CELLS = 20
# Half the cells spread wider than the baseline: a quarter 4x, a quarter 8x (strong augmentation at a short
# budget spreads its seeds this way: the quick study's stage 5 cell has about 6x the baseline's seed sd).
WIDTHS = np.r_[np.ones(N_CELLS // 2), np.full(N_CELLS // 4, 4.0), np.full(N_CELLS // 4, 8.0)]


def simulate_family(rng, seed_sds, effects, n_seeds, base_accuracy=0.8, difficulty_sd=1.5):
    """Labels (n,) and predictions (models, seeds, n) of a baseline (model 0) and its cells on shared images.

    Image i has a difficulty d_i shared by every model; model m is right where a_m - d_i + e_mi > 0, with
    e_mi ~ N(0, 1) its own per-image noise, and otherwise predicts a uniformly drawn wrong class. The
    ability a_m gives accuracy base_accuracy + effects[m] + seed_sds[m] * N(0, 1) on the image population.
    """
    n_models = len(seed_sds)
    y = rng.integers(0, K, N_IMAGES)
    difficulty = rng.normal(0.0, difficulty_sd, N_IMAGES)  # (n,)
    accuracy = base_accuracy + effects[:, None] + seed_sds[:, None] * rng.standard_normal((n_models, n_seeds))
    ability = sps.norm.ppf(np.clip(accuracy, 0.01, 0.99)) * np.sqrt(1 + difficulty_sd**2)  # (models, seeds)
    noise = rng.standard_normal((n_models, n_seeds, N_IMAGES), dtype=np.float32)
    right = noise < (ability[..., None] - difficulty).astype(np.float32)  # (models, seeds, n)
    wrong = (y + rng.integers(1, K, right.shape, dtype=np.int8)) % K
    return y, np.where(right, y, wrong)


def verdicts_after_top_up(rng, effect: float, top_up: pipeline.TopUp | None) -> np.ndarray:
    """One simulated family: plan seeds from the first 3 (as the grid does), then the verdicts (cells,)."""
    seed_sds = SEED_SD * np.r_[1.0, WIDTHS]
    cap = top_up.seeds_max if top_up else FIRST_SEEDS
    y, preds = simulate_family(rng, seed_sds, np.r_[0.0, np.full(N_CELLS, effect)], cap)  # preds (21, cap, n)
    base_seeds, needs = FIRST_SEEDS, dict.fromkeys(range(N_CELLS), FIRST_SEEDS)
    if top_up is not None:
        first = {cell: list(preds[cell + 1, :FIRST_SEEDS]) for cell in range(N_CELLS)}
        base_seeds, needs = pipeline.family_seed_counts(y, list(preds[0, :FIRST_SEEDS]), first, top_up)
    cells = {cell: list(preds[cell + 1, :n]) for cell, n in needs.items()}
    verdicts = stats.compare_family(y, list(preds[0, :base_seeds]), cells)
    return np.array([verdicts[cell]["significant"] for cell in range(N_CELLS)])


def test_top_up_gives_power_where_half_the_cells_spread_wider_and_keeps_the_error_rate():
    """Half the cells 4x and 8x wider, 20 cells, 3 first seeds, top-up to detect +0.02 (cap 8), 2,000 images.

    400 families without any effect: the family-wise false-positive rate stays at 0.05 (its Monte-Carlo
    standard error is 0.011 at 0.05, so the estimate may not exceed 0.05 + 2 SE). 400 families with +0.05 in
    every cell: a cell is found with probability at least 0.6 (the mean share of flagged cells; its
    Monte-Carlo error, the spread of the per-family share / sqrt(400), is about 0.005). The narrow cells
    reach it, the 4x cells partly; the 8x cells cannot within the cap of 8 seeds.
    """
    rng = np.random.default_rng(160)
    n_families = 400
    false_positive = np.mean([verdicts_after_top_up(rng, 0.0, pipeline.TopUp()).any() for _ in range(n_families)])
    shares = [verdicts_after_top_up(rng, 0.05, pipeline.TopUp()).mean() for _ in range(n_families)]
    assert false_positive <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / n_families)
    assert np.mean(shares) >= 0.6


def test_wide_cells_get_more_seeds_and_the_baseline_the_most_any_cell_needs():
    rng = np.random.default_rng(161)
    seed_sds = SEED_SD * np.array([1.0, 1.0, 1.0, 8.0, 8.0])  # the baseline, then four cells
    y, preds = simulate_family(rng, seed_sds, np.zeros(5), FIRST_SEEDS)
    first = {name: list(preds[m]) for m, name in enumerate(["narrow", "narrow too", "wide", "wide too"], 1)}
    top_up = pipeline.TopUp(seeds_max=12, min_effect=0.05)
    base_seeds, needs = pipeline.family_seed_counts(y, list(preds[0]), first, top_up)
    assert max(needs["narrow"], needs["narrow too"]) < min(needs["wide"], needs["wide too"]) <= 12
    assert min(needs.values()) >= FIRST_SEEDS and base_seeds == max(needs.values())
    # Holm's strictest level falls with the family's size: a cell planned alone needs no more seeds.
    alone_base, alone = pipeline.family_seed_counts(y, list(preds[0]), {"wide": first["wide"]}, top_up)
    assert alone["wide"] <= needs["wide"] and alone_base <= base_seeds


def test_seed_sequence_continues_above_the_first_seeds():
    assert pipeline.seed_sequence((0, 1, 2), 5) == [0, 1, 2, 3, 4]
    assert pipeline.seed_sequence((42, 7), 4) == [42, 7, 43, 44]
    assert pipeline.seed_sequence((0, 0, 1), 2) == [0, 1]


@pytest.mark.parametrize("options, message", [({"seeds_max": 1}, "seeds_max"), ({"min_effect": 0.0}, "min_effect"),
                                              ({"power": 1.0}, "power")])
def test_top_up_settings_that_cannot_work_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        pipeline.TopUp(**options)
