"""One run as a unit, the grid through the queue, tuning, distillation, summaries, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import config
import data_loading
import experiments
import pipeline
import reports
import runs
import stats
from config import ConfigError, TrainConfig

# Tiny runs: a few hundred synthetic images, one or two epochs, CPU.
TINY = dict(dataset="synthetic", n_train=600, n_test=300, epochs=1, batch_size=128, eval_batch_size=512)
SEVERITIES = (2,)


def tiny_config(**overrides) -> TrainConfig:
    return config.preset_config("original", **{**TINY, **overrides})


def comparable(report: dict) -> dict:
    """The parts of a report that must not depend on timing or on when it ran."""
    history = [{k: v for k, v in h.items() if "seconds" not in k and "per_s" not in k} for h in report["history"]]
    return {"test": report["test"], "history": history, "ci": report["test_f1_macro_ci"],
            "robustness": report["robustness"], "predictions": report["test_predictions"]}


def test_run_writes_report_and_model_and_is_deterministic(project_dirs, monkeypatch):
    cfg = tiny_config(stage="stage5_occlusion", p_aug=0.5, seed=3)
    first = runs.run(cfg, severities=SEVERITIES)
    run_id = runs.run_id(cfg)
    report = json.loads((config.RUNS_DIR / f"{run_id}.json").read_text())
    assert report["config"]["stage"] == "stage5_occlusion" and report["synthetic"] is True
    assert report["augment_path"] == "batched"
    assert report["test_f1_macro_ci"]["low"] <= report["test"]["f1_macro"] <= report["test_f1_macro_ci"]["high"]
    assert len(report["test_predictions"]) == report["sizes"]["test"]
    assert set(report["robustness"]["f1_macro"]) == {"affine", "color", "blur", "noise", "occlusion"}
    state = torch.load(config.MODELS_DIR / f"{run_id}.pt", weights_only=True)
    assert "classifier.weight" in state or any(k.endswith("weight") for k in state)

    # A finished identical run is loaded, not retrained.
    with monkeypatch.context() as patch:
        patch.setattr(runs, "train_model", lambda *a, **k: pytest.fail("retrained a finished run"))
        assert runs.run(cfg, severities=SEVERITIES) == first

    # The same seed in a fresh reports folder gives identical metrics on the CPU.
    fresh = project_dirs / "again"
    monkeypatch.setattr(config, "RUNS_DIR", fresh / "runs")
    monkeypatch.setattr(config, "MODELS_DIR", fresh / "models")
    second = runs.run(cfg, severities=SEVERITIES)
    assert comparable(second) == comparable(first)


def test_interrupted_run_resumes_to_the_same_result(project_dirs, monkeypatch):
    cfg = tiny_config(epochs=2, stage="stage2_geometry", p_aug=1.0)
    reference = runs.run(cfg, severities=SEVERITIES)

    monkeypatch.setattr(config, "RUNS_DIR", project_dirs / "b" / "runs")
    monkeypatch.setattr(config, "MODELS_DIR", project_dirs / "b" / "models")

    def crash_after_first_epoch(epoch, record):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runs.run(cfg, severities=SEVERITIES, on_epoch_end=crash_after_first_epoch)
    assert runs.checkpoint_path(runs.run_id(cfg)).exists()
    assert not runs.report_path(runs.run_id(cfg)).exists()
    resumed = runs.run(cfg, severities=SEVERITIES)
    assert comparable(resumed) == comparable(reference)
    assert not runs.checkpoint_path(runs.run_id(cfg)).exists()


@pytest.mark.parametrize(
    "overrides, expected",
    [({"model": "vgg"}, "simplecnn"), ({"p_aug": 1.5}, "[0, 1]"),
     ({"p_aug": -0.1}, "[0, 1]"), ({"preset": "fancy"}, "original")],
)
def test_bad_configuration_is_a_clear_error(overrides, expected):
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        config.preset_config(overrides.pop("preset", "original"), **overrides)


def test_unknown_stage_fails_before_training(project_dirs, monkeypatch):
    monkeypatch.setattr(runs, "train_model", lambda *a, **k: pytest.fail("trained with an unknown stage"))
    with pytest.raises(ConfigError, match="unknown stage 'stage9'.*stage1_basic"):
        runs.run(tiny_config(stage="stage9", p_aug=0.5))


def test_cli_bad_input_exits_2_with_message(project_dirs, capsys):
    assert experiments.main(["run", "--p-aug", "1.5", "--n-train", "300"]) == 2
    assert "p_aug must lie in [0, 1]" in capsys.readouterr().err


def test_p_aug_zero_is_one_run_for_every_stage():
    base = tiny_config()
    configs = pipeline.grid_configs(["simplecnn"], config.STAGES[1:], [0.0, 0.5], [1, 2], base)
    # 5 stages x p=0.5 x 2 seeds + the shared p=0 baseline x 2 seeds
    assert len(configs) == 12
    assert sum(c.stage == "none" for c in configs) == 2


def test_corrupt_report_is_left_out_with_a_line_and_loses_nothing(project_dirs, capsys):
    good = runs.run(tiny_config(seed=5), severities=SEVERITIES)
    bad = config.RUNS_DIR / "synthetic-simplecnn-broken.json"
    bad.write_text('{"schema_version": 1, "run_id": ')
    assert list(reports.load_reports()["run_id"]) == [good["run_id"]]
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "broken.json" in line]
    assert line.startswith("warning: left out report") and "delete it" in line
    with pytest.raises(runs.ReportError, match="broken.json.*delete it"):
        runs.read_report(bad)  # read on its own, it is an error
    assert runs.report_path(good["run_id"]).exists() and bad.exists()


def test_grid_summary_and_figures(project_dirs):
    journal = str(project_dirs / "queue.journal")
    base = tiny_config()
    done = pipeline.grid(["simplecnn"], ["stage1_basic", "stage5_occlusion"], [0.0, 1.0], [7],
                         base=base, storage=journal, queue_name="g", severities=SEVERITIES)
    assert len(done) == 3
    assert pipeline.enqueue_grid(pipeline.grid_configs(["simplecnn"], ["stage1_basic"], [0.0, 1.0], [7],
                                                       base), journal, "g") == 0
    frame = reports.load_reports()
    assert len(frame) == 3
    from_storage = reports.load_reports(journal, "g")
    assert sorted(from_storage["run_id"]) == sorted(frame["run_id"])

    table = reports.summarize(frame)
    augmented = table[table["stage"] != "none"]
    # One seed per cell: the seed-aware comparison tests nothing and says why.
    assert augmented["p_value"].isna().all() and not augmented["significant"].any()
    assert (augmented["note"] == "one seed: seed variation unknown").all()
    markdown, csv_path = reports.write_summary(frame)
    assert "synthetic SVHN (not real data)" in markdown and csv_path.exists()
    assert "No cell is tested: a verdict needs at least 2 seeds" in markdown and "Holm over" not in markdown
    assert "(images only)" in markdown and (table["ci_kind"] == stats.IMAGES_ONLY).all()
    for _, row in augmented.iterrows():  # flags come before verdicts in the conclusions
        expected = "not distinguishable from chance" if row["at_chance"] else "no verdict (one seed"
        assert expected in reports.conclusion(row) and reports.conclusion(row) in markdown
    paths = reports.figures(frame, formats=("pdf",))
    family = reports.family_slug(frame, table)
    assert family.startswith(f"simplecnn-{base.preset}-") and len(reports.families(table)) == 1
    names = {p.name for p in paths}
    for figure in ("forest", "difference_heatmap", "effect_vs_budget", "robustness_drops", "per_class_f1",
                   "learning_curves", "confusion_best"):
        assert {f"synthetic_{family}_{figure}.png", f"synthetic_{family}_{figure}.pdf"} <= names, figure
    assert all(p.stat().st_size > 1000 for p in paths)
    thumbnails = reports.gallery(frame, project_dirs / "reports" / "gallery")
    assert sorted(p.stem for p in thumbnails) == sorted(reports.GALLERY_FIGURES)
    with pytest.raises(config.ConfigError, match="inside the project"):  # never written outside it
        reports.gallery(frame, project_dirs / "elsewhere")
    assert not (project_dirs / "elsewhere").exists()


def test_tune_is_resumable_and_records_divergence(project_dirs, monkeypatch):
    from training import DivergenceError

    journal = str(project_dirs / "tune.journal")
    base = tiny_config(n_train=300)
    calls = []
    real_train_model = runs.train_model

    def sometimes_diverge(cfg, device, **kwargs):
        calls.append(cfg)
        if len(calls) == 2:
            raise DivergenceError(1, 3, float("nan"))
        return real_train_model(cfg, device, **kwargs)

    monkeypatch.setattr(pipeline, "train_model", sometimes_diverge)
    study = pipeline.tune(2, base=base, epochs=1, storage=journal, queue_name="t")
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "FAIL"]
    assert "epoch 1" in study.trials[1].user_attrs["failure_reason"]
    study = pipeline.tune(3, base=base, epochs=1, storage=journal, queue_name="t")
    assert len(study.trials) == 3 and len(calls) == 3
    assert (config.FIGURES_DIR / "synthetic_tuning_optimization_history.png").exists()


def test_distill_compares_teacher_student_and_student_alone(project_dirs):
    teacher = runs.run(tiny_config(seed=11, epochs=4), severities=SEVERITIES)
    table = pipeline.distill(teacher["run_id"], "simplecnn", epochs=1, severities=SEVERITIES)
    assert table["note"] is None, table["note"]  # a 4-epoch teacher beats a 1-epoch student
    names = [row["name"] for row in table["rows"]]
    assert names == ["teacher (simplecnn)", "distilled student (simplecnn)", "student alone (simplecnn)"]
    assert all(row["checkpoint_mb"] > 0 and row["ci_low"] <= row["f1_macro"] <= row["ci_high"]
               for row in table["rows"])
    assert table["seeds"] == [11, 12, 13] and [row["n_seeds"] for row in table["rows"]] == [1, 3, 3]
    student = runs.read_report(runs.report_path(table["rows"][1]["run_id"]))
    assert student["config"]["teacher"] == teacher["run_id"]
    assert not set(table["rows"][1]["run_ids"]) & set(table["rows"][2]["run_ids"])
    # Three seeds per arm: the seed-aware test of distilled student minus student alone gives a verdict.
    difference = table["difference"]
    assert difference["of"] == "distilled student - student alone" and difference["note"] is None
    assert difference["low"] <= difference["diff"] <= difference["high"] and 0 <= difference["p_value"] <= 1
    assert difference["conclusion"] in ("significantly higher", "significantly lower", "no significant difference")


def test_distill_is_skipped_when_the_teacher_does_not_beat_the_student(project_dirs):
    teacher = runs.run(tiny_config(seed=11), severities=SEVERITIES)
    # One seed, the teacher's: the student alone IS the teacher.
    table = pipeline.distill(teacher["run_id"], "simplecnn", seeds=[11], severities=SEVERITIES)
    assert table["note"].startswith("distillation skipped")
    assert [row["name"] for row in table["rows"]] == ["teacher (simplecnn)", "student alone (simplecnn)"]
    assert table["difference"] is None
    assert not list(config.RUNS_DIR.glob("synthetic-kd-*.json"))


def test_one_seed_per_arm_gives_no_verdict(project_dirs):
    table = pipeline.compare_presets(seeds=(0,), n_train=200, n_test=200, epochs=1)
    difference = table["difference"]
    assert difference["p_value"] is None and not difference["significant"]
    assert difference["conclusion"].startswith("no verdict: ")


def _worker_command(storage: str, study: str) -> list[str]:
    return [sys.executable, str(config.ROOT / "experiments.py"), "worker", "--storage", storage, "--study", study,
            "--heartbeat", "1"]


def test_three_worker_processes_run_each_cell_once(project_dirs):
    journal = str(project_dirs / "workers.journal")
    configs = pipeline.grid_configs(["simplecnn"], ["stage1_basic", "stage3_color"], [0.5, 1.0], [1],
                                       tiny_config(n_train=300))
    pipeline.enqueue_grid(configs, journal, "w", severities=SEVERITIES)
    data_loading.prepare_data(configs[0])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen(_worker_command(journal, "w"), env=env, stdout=subprocess.PIPE, text=True)
               for _ in range(3)]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    ran = sum(int(out.split("worker ran ")[1].split()[0]) for out in outputs)
    assert ran == len(configs)
    assert sorted(p.stem for p in config.RUNS_DIR.glob("*.json")) == sorted(runs.run_id(c) for c in configs)


def test_killed_study_resumes_to_the_same_reports(project_dirs, monkeypatch):
    """A tiny study killed mid-way and started again ends with the reports of an uninterrupted one."""
    script = (
        "import pipeline\n"
        "plan = pipeline.StudyPlan(\n"
        "    simple_stages=('stage1_basic',), simple_p_augs=(0.0, 1.0), seeds=(1,), extra_stages=(),\n"
        "    resnet_stages=('stage1_basic',), resnet_p_augs=(0.0,), simple_epochs=1, resnet_epochs=1,\n"
        "    tune_trials=1, tune_epochs=1, final_epochs=1, n_train=300, n_test=200, resnet_n_train=150,\n"
        "    severities=(2,), large_model='simplecnn')\n"
        "pipeline.run_study('synthetic', quick=True, heartbeat=1, plan=plan)\n"
    )
    env_a = {**os.environ, "SVHN_AUG_REPORTS_DIR": str(project_dirs / "a" / "reports"),
             "SVHN_AUG_MODELS_DIR": str(project_dirs / "a" / "models"), "OMP_NUM_THREADS": "2"}
    env_b = {**env_a, "SVHN_AUG_REPORTS_DIR": str(project_dirs / "b" / "reports"),
             "SVHN_AUG_MODELS_DIR": str(project_dirs / "b" / "models")}
    command = [sys.executable, "-c", script]
    subprocess.run(command, env=env_a, cwd=config.ROOT, check=True, capture_output=True, timeout=600)

    runs_b = project_dirs / "b" / "reports" / "runs"
    victim = subprocess.Popen(command, env=env_b, cwd=config.ROOT, stdout=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (runs_b.exists() and any(runs_b.glob("*.json"))) and time.time() < deadline:
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    subprocess.run(command, env=env_b, cwd=config.ROOT, check=True, capture_output=True, timeout=600)

    def reports(folder):
        return {p.name: comparable(json.loads(p.read_text())) for p in sorted(folder.glob("*.json"))}

    a, b = reports(project_dirs / "a" / "reports" / "runs"), reports(runs_b)
    assert a.keys() == b.keys() and len(a) >= 4
    assert [name for name in a if a[name] != b[name]] == []


def test_eda_figures_from_the_command_line(project_dirs, capsys):
    assert experiments.main(["eda", "--dataset", "synthetic", "--format", "svg"]) == 0
    written = capsys.readouterr().out.split()
    assert len(written) == 12 and {path.rsplit(".", 1)[1] for path in written} == {"png", "svg"}
    assert (config.FIGURES_DIR / "synthetic_eda_stage_gallery.png").stat().st_size > 10_000
