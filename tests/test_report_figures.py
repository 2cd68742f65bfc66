"""What the study figures are built from: verdict kinds, robustness drops over seeds, forest rows, budgets."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import reports
import stats


def fake_report(f1: float, corrupted: dict[str, float] | None, run_id: str = "r") -> dict:
    """The report fields the figure builders read."""
    robustness = ({"severities": [2], "f1_macro": corrupted, "mean_f1_macro": float(np.mean(list(corrupted.values())))}
                  if corrupted else {"severities": [], "f1_macro": {}, "mean_f1_macro": None})
    return {"run_id": run_id, "test": {"f1_macro": f1}, "robustness": robustness}


def test_robustness_drops_are_means_with_intervals_over_seeds():
    seeds = [fake_report(0.9, {"blur": 0.7, "noise": 0.8}), fake_report(0.92, {"blur": 0.8, "noise": 0.8}),
             fake_report(0.94, {"blur": 0.7, "noise": 0.9})]
    drops = reports.robustness_drops({"cell": seeds, "one seed": seeds[:1],
                                      "not scored": [fake_report(0.9, None)]})
    assert set(drops["run"]) == {"cell", "one seed"}  # runs without corruption scores are left out
    blur = drops[(drops["run"] == "cell") & (drops["kind"] == "blur")].iloc[0]
    expected = stats.seed_summary([0.2, 0.12, 0.24])
    assert blur["drop"] == pytest.approx(expected["mean"]) and blur["n_seeds"] == 3
    assert (blur["low"], blur["high"]) == pytest.approx((expected["ci_low"], expected["ci_high"]))
    mean = drops[(drops["run"] == "cell") & (drops["kind"] == "mean over kinds")].iloc[0]
    assert mean["drop"] == pytest.approx(np.mean([0.9 - 0.75, 0.92 - 0.8, 0.94 - 0.8]))
    single = drops[drops["run"] == "one seed"]
    assert single["low"].isna().all() and single["high"].isna().all()  # one seed: no interval


CELL = dict(stage="stage1_basic", at_chance=False, diff=0.03, note="", significant=True)


@pytest.mark.parametrize(("changes", "kind"), [
    ({}, "better"), ({"diff": -0.03}, "worse"), ({"significant": False}, "no difference"),
    ({"note": "one seed: seed variation unknown", "significant": False}, "not tested"),
    ({"diff": np.nan, "significant": False}, "not tested"), ({"at_chance": True}, "at chance"),
    ({"stage": "none"}, "baseline"),
])
def test_verdict_kind(changes, kind):
    assert reports.verdict_kind(pd.Series(CELL | changes)) == kind


def test_forest_rows_put_seeds_around_the_baseline_mean():
    frame = pd.DataFrame({"run_id": ["b0", "b1", "c0", "c1"], "f1_macro": [0.90, 0.92, 0.95, 0.97]})
    cells = pd.DataFrame([
        dict(stage="stage1_basic", p_aug=0.5, f1_mean=0.96, diff=0.05, diff_low=0.01, diff_high=0.09,
             at_chance=False, note="", significant=True, run_ids=["c0", "c1"]),
        dict(stage="none", p_aug=0.0, f1_mean=0.91, diff=np.nan, diff_low=np.nan, diff_high=np.nan,
             at_chance=False, note="", significant=False, run_ids=["b0", "b1"]),
    ])
    base, cell = reports.forest_rows(frame, cells)  # the baseline first, whatever the table's order
    assert base["label"] == "no augmentation (macro-F1 0.910)" and base["verdict"] == "baseline"
    np.testing.assert_allclose(base["seed_diffs"], [-0.01, 0.01])
    assert cell["label"] == "stage1_basic, p_aug 0.5" and cell["verdict"] == "better"
    np.testing.assert_allclose(cell["seed_diffs"], [0.04, 0.06])
    assert (cell["diff"], cell["low"], cell["high"]) == (0.05, 0.01, 0.09)


def test_budget_text_in_words():
    assert reports.budget_text(2700, 1, 1) == "2,700 train images, 1 epoch, 1 seed"
    cells = pd.DataFrame({"train_images": [2700, 2700], "epochs": [5, 5], "n_seeds": [3, 8]})
    assert reports.cells_budget(cells) == "2,700 train images, 5 epochs, 3-8 seeds per cell"
