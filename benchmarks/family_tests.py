"""Family-wise false-positive rate and power of stats.compare_family's test, by simulation.

Each simulated family is a baseline and its cells with 3 training seeds each, summarised as the test
sees them (stats.family_tests): per-group seed mean and variance, and the test-image variance of each
cell's difference. A seed's macro-F1 is

    true mean of its group + seed_sd * N(0, 1) + IMAGE_SD * N(0, 1)

where IMAGE_SD is the model's own noise on the shared test images. It is calibrated to the image-level
simulation of tests/test_stats.py (10 classes, 2,000 test images, accuracy 0.8, shared item
difficulty), whose delta-method test-image standard error of a 3-seed vs 3-seed difference is 0.0053:
IMAGE_SD^2 * (1/3 + 1/3) = 0.0053^2. The delta-method variance counts this noise again (it is already
in the seed values), as compare_family does. Seed sd 0.01 is the quick study's baseline spread;
"4x/8x wider" multiplies a group's seed sd. Holm at 0.05 within each family.

    python benchmarks/family_tests.py [--families 20000] [--seed 0]

prints the README's simulation table (Markdown) with each rate's Monte-Carlo standard error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import stats  # noqa: E402

IMAGE_SD = 0.0053 / np.sqrt(2 / 3)  # one model's own test-image noise in macro-F1
SEED_SD = 0.01
EFFECT = 0.05
N_SEEDS = 3


def _spread(n_cells: int, wide: dict[int, float] | None = None) -> np.ndarray:
    """Seed sd of the baseline (index 0) and n_cells cells; wide maps a group index to its factor."""
    sd = np.full(n_cells + 1, SEED_SD)
    for group, factor in (wide or {}).items():
        sd[group] *= factor
    return sd


def _half_wider(n_cells: int, factors: tuple[float, ...]) -> np.ndarray:
    """The first half of the cells wider, split evenly between the factors."""
    half = np.arange(1, n_cells // 2 + 1)
    return _spread(n_cells, {int(g): factors[i * len(factors) // half.size] for i, g in enumerate(half)})


def _effects(n_cells: int, null_cells: tuple[int, ...] = ()) -> np.ndarray:
    """+EFFECT in every cell but null_cells (group indices); the baseline 0."""
    effects = np.r_[0.0, np.full(n_cells, EFFECT)]
    effects[list(null_cells)] = 0.0
    return effects


# name -> (seed sd per group, true mean shift per group); baseline first.
NULL_SCENARIOS = {
    "equal spread, 20 cells": (_spread(20), np.zeros(21)),
    "one cell 4x wider, 20 cells": (_spread(20, {1: 4}), np.zeros(21)),
    "one cell 8x wider, 20 cells": (_spread(20, {1: 8}), np.zeros(21)),
    "one cell 8x wider, 48 cells": (_spread(48, {1: 8}), np.zeros(49)),
    "the baseline 8x wider, 20 cells": (_spread(20, {0: 8}), np.zeros(21)),
    "half the cells 4x wider, 20 cells": (_half_wider(20, (4,)), np.zeros(21)),
    "half the cells 8x wider, 20 cells": (_half_wider(20, (8,)), np.zeros(21)),
    "half the cells 4x and 8x wider, 20 cells": (_half_wider(20, (4, 8)), np.zeros(21)),
    # The quick study: baseline sd 0.01, a mild cell, stage 5 at p_aug 0.5 with sd about 0.065.
    "quick study's 3 groups (sd 0.01, 0.02, 0.065)": (np.array([0.01, 0.02, 0.065]), np.zeros(3)),
}
POWER_SCENARIOS = {
    "+0.05 in every cell, equal spread, 20 cells": (_spread(20), _effects(20)),
    "+0.05 in every cell, equal spread, 48 cells": (_spread(48), _effects(48)),
    "+0.05 in 19 cells, one null cell 8x wider, 20 cells": (_spread(20, {1: 8}), _effects(20, (1,))),
    "+0.05 in every cell, half the cells 4x and 8x wider": (_half_wider(20, (4, 8)), _effects(20)),
}


def simulate(rng: np.random.Generator, families: int, seed_sd: np.ndarray, means: np.ndarray,
             n_seeds: int = N_SEEDS) -> tuple:
    """family_tests' inputs for `families` simulated families: means, variances (F, G), counts (G,),
    test_var (F, G - 1)."""
    groups = seed_sd.size
    noise = np.hypot(seed_sd, IMAGE_SD)[None, :, None]  # seed and own test-image noise, independent
    values = means[None, :, None] + noise * rng.standard_normal((families, groups, n_seeds))  # (F, G, S)
    counts = np.full(groups, n_seeds)
    test_var = np.full((families, groups - 1), IMAGE_SD**2 * (1 / n_seeds + 1 / n_seeds))
    return values.mean(axis=-1), values.var(axis=-1, ddof=1), counts, test_var


def error_rates(seed_sd: np.ndarray, means: np.ndarray, families: int, seed: int = 0) -> dict:
    """Family-wise false-positive rate over the null cells and power over the others, each with its
    Monte-Carlo standard error (power's from the spread of the per-family share: cells of a family
    share a baseline), and how often the family shared a prior."""
    rng = np.random.default_rng(seed)
    tests = stats.family_tests(*simulate(rng, families, seed_sd, means))
    null = means[1:] == means[0]
    flagged = tests["significant"]  # (F, C)
    out = {"families": families, "shared_prior": float(tests["shared"].mean())}
    if null.any():
        rate = float(np.mean(flagged[:, null].any(axis=1)))
        out |= {"false_positive": rate, "false_positive_se": float(np.sqrt(rate * (1 - rate) / families))}
    if (~null).any():
        share = flagged[:, ~null].mean(axis=1)
        out |= {"power": float(share.mean()), "power_se": float(share.std() / np.sqrt(families))}
    return out


def table(families: int, seed: int) -> str:
    lines = ["| scenario (3 seeds, seed sd 0.01) | family-wise false-positive rate | power per cell (+0.05) |",
             "|---|---:|---:|"]
    for name, (sd, means) in {**NULL_SCENARIOS, **POWER_SCENARIOS}.items():
        r = error_rates(sd, means, families, seed)
        fp = f"{r['false_positive']:.3f} ± {r['false_positive_se']:.3f}" if "false_positive" in r else ""
        power = f"{r['power']:.3f} ± {r['power_se']:.3f}" if "power" in r else ""
        lines.append(f"| {name} | {fp} | {power} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", type=int, default=20000, help="simulated families per scenario")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"{args.families:,} simulated families per scenario; ± one Monte-Carlo standard error")
    print(table(args.families, args.seed))


if __name__ == "__main__":
    main()
