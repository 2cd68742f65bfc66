"""Run identity, selection on validation, seeded loaders and refused comparisons."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import augmentations
import config
import data_loading
import pipeline
import reports
import runs
from augmentations import Affine, ColorJitter, register_stage
from config import ConfigError
from runs import ReportError

TINY = dict(dataset="synthetic", n_train=300, n_test=200, epochs=1, batch_size=128)


def tiny(**overrides) -> config.TrainConfig:
    return config.preset_config("original", **{**TINY, **overrides})


def test_identical_settings_share_one_id(project_dirs):
    base = tiny(stage="stage1_basic", p_aug=1.0)
    same = [
        dataclasses.replace(base, p_aug=1),  # 1 and 1.0
        dataclasses.replace(base, eval_batch_size=17),  # evaluation batches do not change results
        dataclasses.replace(base, num_workers=7),  # no DataLoader workers with the device loader
        dataclasses.replace(base, kd_alpha=0.1, kd_temperature=9.0),  # no teacher: distillation unused
        dataclasses.replace(base, preset="strong"),  # the name; its values are the other fields
    ]
    assert {runs.run_id(cfg) for cfg in same} == {runs.run_id(base)}
    assert runs.run_id(dataclasses.replace(base, stage="stage5_occlusion", p_aug=0.0)) == runs.run_id(
        dataclasses.replace(base, stage="none", p_aug=0.0))
    assert runs.run_id(dataclasses.replace(base, seed=43)) != runs.run_id(base)
    assert runs.run_id(dataclasses.replace(base, loader="torch", num_workers=7)) != runs.run_id(
        dataclasses.replace(base, loader="torch", num_workers=0))


def test_subset_sizes_at_or_above_the_split_are_the_whole_split(project_dirs, capsys):
    whole = tiny(n_train=None, n_test=None)
    too_many = tiny(n_train=999_999, n_test=10**6)
    assert runs.run_id(too_many) == runs.run_id(whole)
    assert "the whole split is used" in capsys.readouterr().err
    assert runs.canonical_config(too_many).n_train is None


def test_regenerated_data_gets_a_new_id(project_dirs, tmp_path, monkeypatch):
    cfg = tiny()
    before = runs.run_id(cfg)
    other = tmp_path / "other-data"
    data_loading.make_synthetic_svhn(other, n_train=700, n_test=300, seed=1)
    monkeypatch.setattr(config, "DATA_DIR", other)
    assert runs.run_id(cfg) != before


def test_redefined_custom_stage_and_edited_spec_get_new_ids(project_dirs, monkeypatch):
    register_stage("lab_stage", (Affine(10.0, (0.05, 0.05), (0.95, 1.05)),))
    cfg = tiny(stage="lab_stage", p_aug=0.5)
    first = runs.run_id(cfg)
    register_stage("lab_stage", (Affine(10.0, (0.05, 0.05), (0.95, 1.05)), ColorJitter(0.3, 0.3)))
    assert runs.run_id(cfg) != first

    built_in = tiny(stage="stage1_basic", p_aug=0.5)
    before = runs.run_id(built_in)
    edited = tuple(dataclasses.replace(op, p=0.25) if isinstance(op, augmentations.HFlip) else op
                   for op in augmentations.STAGE_SPECS["stage1_basic"])
    monkeypatch.setitem(augmentations.STAGE_SPECS, "stage1_basic", edited)
    assert runs.run_id(built_in) != before


def _rewrite(report: dict, *, val: float, test: float) -> dict:
    """A finished report whose validation and test scores are set by hand."""
    report = {**report, "history": [{**h, "val_f1_macro": val} for h in report["history"]]}
    report["test"] = {**report["test"], "f1_macro": test}
    runs.report_path(report["run_id"]).write_text(json.dumps(report))
    return report


def test_teacher_and_best_cell_are_selected_on_validation(project_dirs):
    a = runs.run(tiny(model="simplecnn", seed=1), severities=())
    b = runs.run(tiny(model="simplecnn", seed=2), severities=())
    _rewrite(a, val=0.9, test=0.1)  # best on validation, worst on test
    _rewrite(b, val=0.2, test=0.95)
    assert pipeline.best_run_id("simplecnn", "synthetic") == a["run_id"]


def test_comparisons_refuse_runs_tested_on_other_images(project_dirs):
    a = runs.run(tiny(seed=1), severities=())
    b = runs.run(tiny(seed=2), severities=())
    labels = list(b["test_labels"])
    labels[0] = str((int(labels[0]) + 1) % 10)
    b = {**b, "test_labels": "".join(labels)}
    runs.report_path(b["run_id"]).write_text(json.dumps(b))
    with pytest.raises(ReportError, match="different test images"):
        reports.summarize(reports.load_reports())
    assert a["run_id"] in {p.stem for p in config.RUNS_DIR.glob("*.json")}


def _first_batch_labels(cfg: config.TrainConfig) -> torch.Tensor:
    data = data_loading.prepare_data(cfg)
    (train, _, _), path = runs.make_loaders(cfg, data, "cpu")
    assert path == "per-sample"
    return next(iter(train))[1]


def test_the_torch_loader_follows_the_run_seed(project_dirs):
    cfg = tiny(loader="torch", num_workers=0, stage="stage1_basic", p_aug=0.5)
    same = _first_batch_labels(cfg)
    assert torch.equal(_first_batch_labels(cfg), same)
    assert not torch.equal(_first_batch_labels(dataclasses.replace(cfg, seed=7)), same)


def test_report_records_flags_budget_and_model_hash(project_dirs):
    report = runs.run(tiny(), severities=())
    assert report["budget"] == {"train_images": report["sizes"]["train"], "epochs": 1}
    assert set(report["flags"]) == {"at_chance", "still_improving", "chance_f1_macro"}
    assert report["flags"]["still_improving"] is True  # one epoch: nothing says it has stopped improving
    assert len(report["model_sha256"]) == 64 and report["robustness"]["mean_f1_macro"] is None
    # A damaged model file is caught wherever the model is loaded.
    runs.model_path(report["run_id"]).write_bytes(b"not a model")
    with pytest.raises(ReportError, match="does not match its report"):
        runs.load_teacher(report["run_id"], "cpu")


def test_preflight_refuses_an_unavailable_device_before_training(project_dirs, monkeypatch):
    monkeypatch.setattr(runs, "train_model", lambda *a, **k: pytest.fail("trained on a missing device"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="not available"):
        runs.run(tiny(seed=5), device="cuda")
