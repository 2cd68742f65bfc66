"""The command line: what --help and usage errors load, finished runs loaded or retrained (--force), run
ids old and new, `runs list/show/diff`, and `status` over a whole storage or one queue."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import config
import experiments
import pipeline
import run_catalog
import runs
import work_queue
from config import ConfigError

# Tiny runs: 200 synthetic train images, one epoch, no corruption evaluation.
TINY = dict(dataset="synthetic", n_train=200, n_test=200, epochs=1, batch_size=128, eval_batch_size=512)
TINY_FLAGS = ["--n-train", "200", "--n-test", "200", "--epochs", "1", "--batch-size", "128", "--eval-batch-size", "512",
              "--severities"]
HEAVY_MODULES = ("torch", "torchvision", "seaborn", "scipy", "pandas", "optuna", "matplotlib", "runs", "reports",
                 "pipeline", "data_loading", "training", "work_queue", "augmentations")


def tiny_config(**overrides) -> config.TrainConfig:
    return config.preset_config("original", **{**TINY, **overrides})


def main(argv: list[str], capsys) -> tuple[int, str, str]:
    """experiments.main in this process: (exit status, stdout, stderr)."""
    try:
        status = experiments.main(argv)
    except SystemExit as exit_:  # usage errors leave through argparse's exit
        status = exit_.code
    out = capsys.readouterr()
    return status, out.out, out.err


# ---------------------------------------------------------------- what the parser loads


LOADS_NOTHING_HEAVY = """
import contextlib, io, json, sys
import experiments
parser = experiments.build_parser()
commands = [[]] + [[name] for name in parser._subparsers._group_actions[0].choices] + [["runs", "list"]]
answers = []
for argv in [c + ["--help"] for c in commands] + [["run", "--bogus"], ["runs"], ["grid", "--stages", "nope"]]:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            experiments.main(argv)
        except SystemExit as exit_:
            answers.append(exit_.code)
status = experiments.main(["run", "--p-aug", "1.5"])  # a bad setting: refused before the library loads
print(json.dumps({"answers": answers, "status": status, "loaded": [m for m in HEAVY if m in sys.modules]}))
"""


def test_help_and_usage_errors_load_no_heavy_module():
    script = f"HEAVY = {HEAVY_MODULES!r}\n" + LOADS_NOTHING_HEAVY
    done = subprocess.run([sys.executable, "-c", script], cwd=config.ROOT, capture_output=True, text=True,
                          timeout=120, check=True)
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["loaded"] == [], result
    assert result["status"] == 2 and "p_aug must lie in [0, 1]" in done.stderr
    help_answers, error_answers = result["answers"][:-3], result["answers"][-3:]
    assert len(help_answers) >= 13 and set(help_answers) == {0} and error_answers == [2, 2, 2]


def test_only_the_library_s_own_errors_count_as_expected():
    assert experiments.is_expected_error(ConfigError("bad"))
    assert experiments.is_expected_error(work_queue.QueueError("bad"))
    assert experiments.is_expected_error(runs.ReportError("bad"))
    assert not experiments.is_expected_error(ValueError("a bug, not a bad input"))
    assert not experiments.is_expected_error(KeyError("bad"))


def test_printed_table_aligns_columns_and_right_aligns_numbers():
    table = experiments.text_table([{"name": "a", "n": 5}, {"name": "longer", "n": 120}]).splitlines()
    assert table[0] == "name      n" and table[2] == "a         5" and table[3] == "longer  120"
    assert len({len(line) for line in table}) == 1


# ---------------------------------------------------------------- run ids, finished runs, --force


def test_run_id_names_lr_epochs_and_train_size():
    cfg = tiny_config(stage="stage3_color", p_aug=0.5, seed=3, lr=3e-3)
    new, legacy = runs.run_ids(cfg)
    assert "-stage3_color-p0.5-lr0.003-e1-n200-s3-" in new
    assert new.rsplit("-", 1)[1] == legacy.rsplit("-", 1)[1]  # the same hash under both
    assert legacy.endswith("-s3-" + legacy.rsplit("-", 1)[1]) and "-lr" not in legacy
    assert "-nfull-" in runs.run_id(tiny_config(n_train=None))
    assert runs.run_id(tiny_config(epochs=2)) != runs.run_id(tiny_config())


def _train_calls(monkeypatch) -> list:
    calls = []
    real = runs.train_model

    def counted(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(runs, "train_model", counted)
    return calls


def test_finished_run_is_loaded_with_one_line_and_force_retrains(project_dirs, monkeypatch, capsys):
    calls = _train_calls(monkeypatch)
    argv = ["run", *TINY_FLAGS, "--seed", "4"]
    assert main(argv, capsys)[0] == 0 and len(calls) == 1
    path = runs.report_path(runs.run_id(tiny_config(seed=4)))
    first = path.read_bytes()

    status, out, err = main(argv, capsys)
    assert status == 0 and len(calls) == 1
    loaded = [line for line in err.splitlines() if "finished run loaded" in line]
    assert loaded == [f"finished run loaded from {path} (retrain it with --force, or force=True)"], err
    assert f"report: {path}" in out

    # An interrupted forced retrain leaves the finished report and model as they were.
    model_bytes = runs.model_path(path.stem).read_bytes()

    def interrupt(epoch, record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runs.run(tiny_config(seed=4), severities=(), force=True, on_epoch_end=interrupt, quiet=True)
    assert path.read_bytes() == first and runs.model_path(path.stem).read_bytes() == model_bytes

    status, out, err = main([*argv, "--force"], capsys)
    assert status == 0 and len(calls) == 3 and "retraining a finished run" in err, err
    retrained = json.loads(path.read_bytes())
    assert retrained["run_id"] == path.stem and list(config.RUNS_DIR.glob("*.json")) == [path]
    assert retrained["model_sha256"] == runs.file_sha256(runs.model_path(path.stem))


def test_reports_under_legacy_ids_are_found_not_retrained(project_dirs, monkeypatch):
    cfg = tiny_config(seed=6)
    new, legacy = runs.run_ids(cfg)
    report = runs.run(cfg, severities=(), quiet=True)
    # Move the finished run to the id an earlier version of the library gave it.
    report["run_id"] = legacy
    runs.report_path(legacy).write_text(json.dumps(report))
    runs.model_path(new).rename(runs.model_path(legacy))
    runs.report_path(new).unlink()

    calls = _train_calls(monkeypatch)
    assert runs.finished_report_path(cfg) == runs.report_path(legacy)
    assert runs.run(cfg, severities=(), quiet=True)["run_id"] == legacy and calls == []
    assert [r["run_id"] for r in pipeline._collect_reports([cfg])] == [legacy]
    # A forced retrain keeps the id it was found under: no second report of the same run appears.
    assert runs.run(cfg, severities=(), quiet=True, force=True)["run_id"] == legacy and len(calls) == 1
    assert sorted(p.name for p in config.RUNS_DIR.glob("*.json")) == [f"{legacy}.json"]


# ---------------------------------------------------------------- runs list / show / diff


@pytest.fixture(scope="module")
def catalog_root(tmp_path_factory, tiny_data_dir):
    """Three finished tiny runs: two seeds of no augmentation and one of stage 1 at lr 0.002."""
    root = tmp_path_factory.mktemp("catalog")
    with pytest.MonkeyPatch.context() as patch:
        _point_config_at(patch, root, tiny_data_dir)
        for cfg in (tiny_config(seed=1), tiny_config(seed=2), tiny_config(seed=1, stage="stage1_basic", p_aug=1.0,
                                                                            lr=2e-3)):
            runs.run(cfg, severities=(), quiet=True)
    return root


def _point_config_at(patch, root, data_dir) -> None:
    patch.setattr(config, "DATA_DIR", data_dir)
    for name, path in (("MODELS_DIR", root / "models"), ("REPORTS_DIR", root / "reports"),
                       ("RUNS_DIR", root / "reports" / "runs"), ("FIGURES_DIR", root / "reports" / "figures")):
        patch.setattr(config, name, path)


@pytest.fixture
def catalog(catalog_root, tiny_data_dir, monkeypatch):
    _point_config_at(monkeypatch, catalog_root, tiny_data_dir)
    return {runs.run_id(cfg): cfg for cfg in (tiny_config(seed=1), tiny_config(seed=2))}


def _listed(out: str) -> list[str]:
    return [line.split()[0] for line in out.splitlines()[2:] if line.startswith("synthetic-")]


def test_runs_list_shows_every_run_and_filters(catalog, capsys):
    status, out, _ = main(["runs", "list"], capsys)
    assert status == 0 and len(_listed(out)) == 3 and out.splitlines()[0].split()[:3] == ["run_id", "model", "stage"]
    assert "3 finished run(s)" in out
    status, out, _ = main(["runs", "list", "--stage", "none"], capsys)
    assert sorted(_listed(out)) == sorted(catalog) and "2 finished run(s)" in out and "match the filters" in out
    assert _listed(main(["runs", "list", "--model", "resnet18"], capsys)[1]) == []
    assert len(_listed(main(["runs", "list", "--dataset", "synthetic"], capsys)[1])) == 3

    families = {row["family"] for row in run_catalog.list_runs()}
    assert len(families) == 2  # lr 0.002 is a family of its own
    for family in families:
        rows = run_catalog.list_runs(family=family[:4])
        assert rows and {row["family"] for row in rows} == {family}
        assert _listed(main(["runs", "list", "--family", family], capsys)[1]) == [r["run_id"] for r in rows]


def test_runs_show_gives_result_files_and_configuration(catalog, capsys):
    run_id = sorted(catalog)[0]
    status, out, _ = main(["runs", "show", run_id[:-3]], capsys)  # a unique prefix is enough
    assert status == 0, out
    assert out.startswith(run_id) and "test macro-F1" in out
    assert f"report: {runs.report_path(run_id)}" in out and f"model: {runs.model_path(run_id)}" in out
    assert "  lr: 0.001" in out and "  seed: " in out and "\nimages: " in out and "best epoch 1 of 1" in out


@pytest.mark.parametrize("reference, message", [("nosuch", "no finished run 'nosuch'"),
                                                ("synthetic-simplecnn-none", "2 runs start with"),
                                                ("../../etc/passwd", "no finished run")])
def test_runs_show_refuses_unknown_or_ambiguous_ids(catalog, capsys, reference, message):
    status, _, err = main(["runs", "show", reference], capsys)
    assert status == 2 and err.startswith("error: ") and message in err and "Traceback" not in err


def test_runs_diff_names_only_the_settings_that_differ(catalog, capsys):
    seed1, seed2 = sorted(catalog, key=lambda key: catalog[key].seed)
    status, out, _ = main(["runs", "diff", seed1, seed2], capsys)
    lines = out.splitlines()
    assert status == 0 and lines[0].split() == ["setting", seed1, seed2]
    assert [line.split() for line in lines[2:]] == [["seed", "1", "2"]]
    stage_run = next(row["run_id"] for row in run_catalog.list_runs(stage="stage1_basic"))
    differing = {row["setting"] for row in run_catalog.diff_runs(seed1, stage_run)}
    assert differing == {"stage", "p_aug", "lr"}
    assert "same configuration" in main(["runs", "diff", seed1, seed1], capsys)[1]


# ---------------------------------------------------------------- status


@pytest.fixture
def journal(project_dirs) -> str:
    """A storage with two queues (one worked on, one failed cell) and a tuning study."""
    path = str(config.REPORTS_DIR / "optuna.journal")
    config.REPORTS_DIR.mkdir(parents=True)
    work_queue.enqueue_cells(path, "alpha", [{"cell_key": key, "n": n} for n, key in enumerate("abc")])
    work_queue.enqueue_cells(path, "beta", [{"cell_key": "x"}, {"cell_key": "y"}])

    def execute(cell: dict) -> dict:
        if cell["n"] == 1:
            raise ValueError("cell b cannot run")
        return {"n": cell["n"]}

    work_queue.run_worker(path, "alpha", execute, heartbeat_interval=0.5, grace_period=2, wait_for_running=False)
    work_queue.create_tuning_study("synthetic-tuning", path, seed=0)
    return path


def test_status_without_a_name_shows_every_queue_with_its_progress(journal, capsys):
    status, out, _ = main(["status"], capsys)  # the default storage, as right after `make demo`
    assert status == 0, out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:] if line and not line.startswith("tuning ")}
    assert rows["alpha"][1:] == ["queue", "2/3", "(67%)", "2", "0", "0", "1"]
    assert rows["beta"][1:] == ["queue", "0/2", "(0%)", "0", "0", "2", "0"]
    assert rows["synthetic-tuning"][1:3] == ["tuning", "0/0"]


def test_status_with_a_name_shows_each_cell(journal, capsys):
    status, out, _ = main(["status", "--storage", journal, "--study", "alpha"], capsys)
    lines = out.splitlines()
    assert status == 0 and lines[0].split()[:4] == ["cell", "state", "retries", "worker"]
    states = {line.split()[0]: line.split()[1] for line in lines[2:5]}
    assert states == {"a": "done", "b": "failed", "c": "done"}
    assert "ValueError: cell b cannot run" in lines[3] and lines[-1] == "alpha: 2/3 cell(s) done"
    cells = work_queue.cell_states(journal, "alpha")
    assert [cell["cell"] for cell in cells] == ["a", "b", "c"] and cells[0]["worker"]


def test_status_of_a_storage_that_does_not_exist_creates_nothing(project_dirs, capsys):
    status, _, err = main(["status"], capsys)
    assert status == 2 and "no queue storage at" in err and "run grid or study first" in err
    assert not config.REPORTS_DIR.exists()


def test_a_failed_cell_queued_again_is_one_waiting_cell(journal):
    work_queue.enqueue_cells(journal, "alpha", [{"cell_key": "b", "n": 1}], retry_failed=True)
    states = {cell["cell"]: cell["state"] for cell in work_queue.cell_states(journal, "alpha")}
    assert states == {"a": "done", "b": "waiting", "c": "done"}
