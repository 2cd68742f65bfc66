"""Declared families: a grid's plan fixes which cells are tested together, whatever else lands in the folder."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest

import config
import pipeline
import reports
import runs
from config import ConfigError
from runs import ReportError

# The demo's shape (a baseline and a stage at p_aug 0.5, two first seeds, top-up to the quick cap) at the
# smallest size that trains: the verdicts are whatever they are, the test is that they stay.
TINY_PLAN = pipeline.StudyPlan(
    simple_stages=("stage1_basic",), simple_p_augs=(0.0, 0.5), seeds=(0, 1), extra_stages=(),
    resnet_stages=(), resnet_p_augs=(), simple_epochs=1, resnet_epochs=0, tune_trials=0, tune_epochs=0,
    final_epochs=0, n_train=300, n_test=200, resnet_n_train=None, severities=(), large_model=None,
    batch_size=128, preset="strong", top_up=pipeline.TopUp(seeds_max=pipeline.QUICK_SEEDS_MAX),
)
VERDICT_COLUMNS = ["stage", "p_aug", "n_seeds", "diff", "diff_low", "diff_high", "p_value", "p_holm", "significant"]


def _plan_tables(markdown: str) -> list[str]:
    """The tables of declared plans in a summary (heading to footer)."""
    return [block for block in markdown.split("### ")[1:] if "; plan " in block.split("\n")[0]]


def test_demo_verdicts_do_not_change_when_another_plan_adds_runs(project_dirs):
    demo = pipeline.run_study("synthetic", quick=True, plan=TINY_PLAN, quiet=True, heartbeat=1,
                              on_step=lambda title: None)
    frame = reports.load_reports()
    before = reports.summarize(frame)
    assert before["plan"].nunique() == 1 and (before["plan"] != "").all()
    assert (before["n_seeds"] >= 2).all() and before["n_seeds"].max() == pipeline.QUICK_SEEDS_MAX  # topped up
    demo_ids = set(frame["run_id"])

    # Another plan on the same folder, as the notebooks add: the p_aug 1 cells with the same settings
    # (its baseline runs are the demo's), and one run outside any plan.
    simple, _ = pipeline.study_configs("synthetic", TINY_PLAN)
    queue = pipeline.study_queue("synthetic", True, "simplecnn-grid")
    p1 = pipeline.grid(("simplecnn",), TINY_PLAN.simple_stages, (0.0, 1.0), TINY_PLAN.seeds, base=simple,
                       queue_name=queue, severities=(), quiet=True, heartbeat=1,
                       top_up=pipeline.TopUp(seeds_max=pipeline.QUICK_SEEDS_MAX))
    lone = runs.run(dataclasses.replace(simple, stage="stage5_occlusion", p_aug=0.5, seed=0), severities=())
    frame = reports.load_reports()
    after = reports.summarize(frame)

    demo_plan = before["plan"].iloc[0]
    kept = after[after["plan"] == demo_plan]
    pd.testing.assert_frame_equal(kept[VERDICT_COLUMNS].reset_index(drop=True),
                                  before[VERDICT_COLUMNS].reset_index(drop=True))
    assert list(kept["family"]) == list(before["family"])
    markdown, _ = reports.write_summary(frame)
    assert _plan_tables(demo) and all(table in markdown for table in _plan_tables(demo))

    # The p_aug 1 grid is a family of its own, sharing the demo's baseline runs, with its own verdicts.
    p1_rows = reports.plan_cells(after, p1)
    assert p1_rows["plan"].iloc[0] != demo_plan and set(p1_rows["p_aug"]) == {0.0, 1.0}
    assert set(p1_rows.loc[p1_rows["stage"] == "none", "run_ids"].iloc[0]) <= demo_ids
    # The run outside any plan is shown with its interval and no verdict, and the table says why.
    outside = after[after["plan"] == ""]
    assert list(outside["run_ids"]) == [[lone["run_id"]]]
    assert outside["p_value"].isna().all() and not outside["significant"].any()
    assert outside["note"].iloc[0] == reports.OUTSIDE_PLAN_NOTE
    assert "Not a declared family" in markdown

    # best_runs compares within one family: the demo's best cell and its own baseline.
    with pytest.raises(ConfigError, match="within one family"):
        reports.best_runs(frame, after)
    demo_cells = after[after["plan"] == demo_plan]
    best, base = reports.best_runs(frame, demo_cells)
    assert best["config"]["stage"] == "stage1_basic" and best["config"]["p_aug"] == 0.5
    assert base["config"]["stage"] == "none" and {best["run_id"], base["run_id"]} <= demo_ids


def test_family_key_ignores_settings_that_do_not_change_results():
    base = config.preset_config("strong", dataset="synthetic", n_train=300)

    def key(**changes) -> str:
        return reports.family_key({"config": dataclasses.asdict(dataclasses.replace(base, **changes))})

    assert key() == key(eval_batch_size=64, num_workers=0, compile=True, loader="torch", preset="original")
    assert key() == key(stage="stage1_basic", p_aug=0.5, seed=3)  # the cells of one family
    assert len({key(), key(lr=0.01), key(epochs=3), key(n_train=600), key(model="resnet18")}) == 5


def test_plan_cells_refuses_runs_that_are_not_one_plan():
    table = pd.DataFrame({"plan": ["a"]})
    with pytest.raises(ConfigError, match="one declared plan"):
        plan = {"id": "a", "cells": [["none", 0.0]], "first_seeds": [0], "run_ids": ["x", "y"], "top_up": None}
        reports.plan_cells(table, [{"run_id": "x", "plans": [plan]}])


def test_a_damaged_plans_field_is_refused():
    plan = {"id": "a", "cells": [["none", 0.0]], "first_seeds": [0], "run_ids": ["r"], "top_up": None}
    assert reports.report_plans({"run_id": "r", "plans": [plan]}) == [plan]
    for damaged in ("a", [{"id": 3}], [plan | {"run_ids": "r"}], [plan | {"top_up": 8}]):
        with pytest.raises(ReportError, match="not a list of declared plans"):
            reports.report_plans({"run_id": "r", "plans": damaged})
