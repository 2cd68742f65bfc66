"""benchmarks/study_time.py's model of cost: what it charges once, per batch size, and per packed grid."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import study_time  # noqa: E402  (benchmarks/ is a folder of scripts)

import config  # noqa: E402
from augmentations import CORRUPTION_KINDS  # noqa: E402
from pipeline import study_plan  # noqa: E402

SIZES = {"train": 3000, "test": 1000}
CORRUPT_RATE = 1000.0  # images/s: 1 s per kind and severity for the quick plan's 1,000 test images


def flat_rates(train_rate: float = 1000.0) -> dict:
    """Made-up rates and costs with every key the model reads (one model rate for every batch size)."""
    per_model = dict.fromkeys(config.MODELS, train_rate)
    batch = {"train": per_model, "eval": per_model, "forward": per_model,
             "first_use_s": dict.fromkeys(config.MODELS, 0.0),
             "augment": dict.fromkeys(config.ALL_STAGES, 1e9)}
    return {"device_type": "cuda", "startup_s": 0.0,
            "by_batch": {study_time.batch_key(b, e): batch for b, e in ((128, 2048), (384, 2048))},
            "corrupt": {kind: {"2": CORRUPT_RATE} for kind in CORRUPTION_KINDS},
            **{key: dict.fromkeys(config.MODELS, 0.0) for key in ("setup_s", "checkpoint_s", "save_s")},
            "report_s": 0.0, "bootstrap_s_per_image": 0.0, "compare_s_per_image": {"fixed": 0.0, "per_array": 0.0},
            "figure_s": 0.0, "trial_s": 0.0, "tuning_figures_s": 0.0, "queue_cell_s": 0.0}


def test_corrupted_copies_are_charged_once_per_process_not_per_run():
    plan = study_plan(quick=True)  # 9 runs on the same 1,000 test images, severity 2
    prediction = study_time.predict_study_seconds(plan, flat_rates(), SIZES)
    assert prediction["runs"] == 9
    assert prediction["components"]["corrupt"] == pytest.approx(len(CORRUPTION_KINDS) * 1000 / CORRUPT_RATE)


def test_runs_are_priced_at_their_own_batch_size():
    plan = study_plan(quick=True)  # batch 128
    rates = flat_rates()
    slow_at_128 = {**rates, "by_batch": {**rates["by_batch"], "128/2048": {
        **rates["by_batch"]["128/2048"], "train": dict.fromkeys(config.MODELS, 500.0)}}}
    fast = study_time.predict_study_seconds(plan, rates, SIZES)["components"]["train"]
    assert study_time.predict_study_seconds(plan, slow_at_128, SIZES)["components"]["train"] == pytest.approx(2 * fast)


def test_a_packed_grid_divides_its_runs_by_the_speedup_and_corrupts_once_per_part():
    plan = study_plan(quick=True)
    alone = study_time.predict_study_seconds(plan, flat_rates(), SIZES)
    packed = study_time.predict_study_seconds(plan, flat_rates(), SIZES, {"simplecnn": {"k": 4, "speedup": 3.0}})
    assert packed["components"]["train"] == pytest.approx(alone["components"]["train"] / 3)
    assert packed["components"]["corrupt"] == pytest.approx(alone["components"]["corrupt"])  # one grid part
