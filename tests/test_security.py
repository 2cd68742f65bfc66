"""The trust boundaries, tried as a hostile or unlucky user would: names and reports that try to reach
outside the project's folders, impossible numbers in received reports, contradictory flags and
environment, damaged or foreign data and model files, storage URLs with typos, full disks, Ctrl-C.

Each case runs through the command line's code (``experiments.main`` in this process; a real process
only where a signal or the import-time environment is the point) or through the library call a user
would make, inside a temporary tree holding the project's folders (``inner/project``), an outside folder
``elsewhere`` with a file of its own, and the working directory ``cwd``. Every case must end with its
exit status and one line naming the problem (an ``error:`` line, a ``warning: left out`` line or an
``interrupted`` line), no traceback, and no file created or changed outside the project's folders
(the whole temporary tree is listed before and after); inside them only the files the case names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

import augmentations
import config
import data_loading
import experiments
import pipeline
import reports
import runs
import training

TINY_RUN = ("--n-train", "100", "--n-test", "100", "--epochs", "1", "--severities")
OUTSIDE = "../../../../elsewhere/evil"
SECRET = "s3cretPW"


@dataclasses.dataclass
class Tree:
    """One case's temporary tree: the project's folders deep inside it, and folders around them."""

    root: Path
    data: Path
    teacher: str  # run id of the finished run in the copied project

    @property
    def project(self) -> Path:
        return self.root / "outer" / "inner" / "project"

    @property
    def reports(self) -> Path:
        return self.project / "reports"

    @property
    def models(self) -> Path:
        return self.project / "models"

    @property
    def elsewhere(self) -> Path:
        return self.root / "elsewhere"

    def report(self) -> dict:
        return json.loads((self.reports / "runs" / f"{self.teacher}.json").read_text())


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    argv: tuple[str, ...] = ()  # experiments.main's arguments; "{teacher}", "{root}" are filled in
    keywords: tuple[str, ...] = ()  # each must appear in the case's line
    status: int = 2  # 0: a bad report left out, the rest summarized; None: a library call that must raise
    prepare: Callable[[Tree], None] | None = None
    call: Callable[[Tree], None] | None = None  # a library call instead of argv: must raise an expected error
    writes: tuple[str, ...] = ()  # globs (relative to the project) of files the case may create or change


# ---------------------------------------------------------------- how cases set up their tree


def tampered(dotted: str, value) -> Callable[[Tree], None]:
    """Add a copy of the finished report with one field replaced (a received, edited report)."""
    def prepare(tree: Tree) -> None:
        report = tree.report()
        *outer, last = dotted.split(".")
        holder = report
        for name in outer:
            holder = holder[name]
        holder[last] = value
        (tree.reports / "runs" / "received.json").write_text(json.dumps(report))

    return prepare


def without(field: str) -> Callable[[Tree], None]:
    """Add a copy of the finished report without one top-level field."""
    def prepare(tree: Tree) -> None:
        report = tree.report()
        del report[field]
        (tree.reports / "runs" / "received.json").write_text(json.dumps(report))

    return prepare


def own_data(tree: Tree) -> Path:
    shutil.copytree(tree.data, tree.project / "data")
    tree.data = tree.project / "data"
    return tree.data


def train_without_digit_3(tree: Tree) -> None:
    path = own_data(tree) / "synthetic" / "train_32x32.mat"
    mat = scipy.io.loadmat(path)
    keep = mat["y"].reshape(-1) != 3
    scipy.io.savemat(path, {"X": mat["X"][..., keep], "y": mat["y"][keep]})


def svhn_raw(tree: Tree) -> Path:
    raw = tree.project / "data" / "raw"
    raw.mkdir(parents=True)
    tree.data = tree.project / "data"
    return raw / "train_32x32.mat"


def matlab_v73_file(tree: Tree) -> None:
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    svhn_raw(tree).write_bytes(header.ljust(512, b" ") + b"\x89HDF\r\n\x1a\n" + bytes(1024))


def labels_out_of_range(tree: Tree) -> None:
    labels = np.array([0, 11] + [1] * 18, dtype=np.float64).reshape(-1, 1)
    scipy.io.savemat(svhn_raw(tree), {"X": np.zeros((32, 32, 3, 20), np.uint8), "y": labels})


class Planted:
    """A pickle that would create a file outside the project if it were ever unpickled."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def forged_model(tree: Tree) -> None:
    """A model file holding a pickle, with the report's hash forged to match it."""
    path = tree.models / f"{tree.teacher}.pt"
    torch.save({"weight": Planted(tree.elsewhere / "pwned")}, path)
    report = tree.report()
    report["model_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (tree.reports / "runs" / f"{tree.teacher}.json").write_text(json.dumps(report))


def stolen_report(tree: Tree) -> None:
    """A report outside the project that a teacher id with '..' would reach."""
    (tree.elsewhere / "runs").mkdir()
    shutil.copy(tree.reports / "runs" / f"{tree.teacher}.json", tree.elsewhere / "runs" / "stolen.json")


def register_outside_stage(tree: Tree) -> None:
    augmentations.register_stage("x/../../../../elsewhere/evil", (augmentations.HFlip(0.5),))


def register_newline_stage(tree: Tree) -> None:
    augmentations.register_stage("my\nstage", (augmentations.HFlip(0.5),))


def run_unregistered_outside_stage(tree: Tree) -> None:
    runs.run(config.preset_config("original", stage=f"x/{OUTSIDE}", p_aug=1.0, n_train=100, n_test=100,
                                  epochs=1), severities=())


def custom_loaders_without_digit_3(tree: Tree) -> None:
    """The custom-data path warns (with the per-class counts) and goes on: the warning is raised here."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data_loading.get_dataloaders_with_custom_train_transform(
            augmentations.get_eval_transform(), augmentations.get_eval_transform(), "synthetic", root=tree.data,
            n_train=100, n_test=100, num_workers=0)


def efbig_run(tree: Tree) -> None:
    """A run under a 100 kB file-size limit: its first checkpoint does not fit (EFBIG, not a crash)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
    try:
        status = experiments.main(["run", "--seed", "3", "--quiet", *TINY_RUN])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    raise SystemExit(status)


def interrupt_self_after(module, name: str, sig: int = signal.SIGINT):
    """Wrap ``module.name`` so that, once it has run, this process receives ``sig`` (a real signal)."""
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        os.kill(os.getpid(), sig)
        return result

    return wrapped


# ---------------------------------------------------------------- the table

NAME_CASES = [
    Case("custom stage name leading outside", keywords=("stage", "'/'"), status=None, call=register_outside_stage),
    Case("custom stage name with a newline", keywords=("stage", "'\\n'"), status=None, call=register_newline_stage),
    Case("unregistered stage name leading outside", keywords=("stage", "'/'"), status=None,
         call=run_unregistered_outside_stage),
    Case("run with a teacher id leading outside", ("run", "--teacher", "../../elsewhere/runs/stolen", *TINY_RUN),
         ("teacher run id", "'/'"), prepare=stolen_report),
    Case("distill a teacher id leading outside", ("distill", "--teacher", "../../elsewhere/runs/stolen",
                                                  "--severities"), ("teacher run id",), prepare=stolen_report),
    Case("report whose model leads outside", ("figures",), ("received.json", "config.model"), status=0,
         prepare=tampered("config.model", OUTSIDE), writes=("reports/figures/*.png",)),
    Case("report whose dataset leads outside", ("figures",), ("received.json", "'dataset'"), status=0,
         prepare=tampered("dataset", OUTSIDE), writes=("reports/figures/*.png",)),
    Case("report whose run id leads outside", ("summary",), ("received.json", "'run_id'"), status=0,
         prepare=tampered("run_id", OUTSIDE), writes=("reports/summary.*",)),
    Case("grid queue name leading outside", ("grid", "--study", OUTSIDE, "--stages", "stage1_basic", "--p-augs", "1",
                                             *TINY_RUN), ("queue name",)),
    Case("status of a queue name with a newline", ("status", "--study", "grid\nx"), ("queue name",)),
    Case("one-slash storage URL with a password", ("status", "--storage", f"postgresql:/alice:{SECRET}@127.0.0.1/db"),
         ("one slash", "postgresql://", "***")),
]

SILENT_WRONG_CASES = [
    Case("report with macro-F1 5.0", ("summary",), ("received.json", "test.f1_macro", "outside [0, 1]"), status=0,
         prepare=tampered("test.f1_macro", 5.0), writes=("reports/summary.*",)),
    Case("report with accuracy -1e308", ("summary",), ("received.json", "test.accuracy"), status=0,
         prepare=tampered("test.accuracy", -1e308), writes=("reports/summary.*",)),
    Case("report with a negative train size", ("figures",), ("received.json", "sizes.train", "-5"), status=0,
         prepare=tampered("sizes.train", -5), writes=("reports/figures/*.png",)),
    Case("report with an interval above 1", ("summary",), ("received.json", "test_f1_macro_ci.high"), status=0,
         prepare=tampered("test_f1_macro_ci.high", 1.5), writes=("reports/summary.*",)),
    Case("train split missing a digit", ("run", "--seed", "4", *TINY_RUN), ("digit(s) 3", "images per digit"),
         prepare=train_without_digit_3, writes=("data/synthetic/*.mat.pt", "data/synthetic/.*")),
    Case("custom data path missing a digit", keywords=("digit(s) 3", "images per digit"), status=None,
         prepare=train_without_digit_3, call=custom_loaders_without_digit_3,
         writes=("data/synthetic/*.mat.pt", "data/synthetic/.*")),
    Case("several SQLite workers on a grid", ("grid", "--workers", "2", "--storage", "sqlite:///{root}/q.db",
                                              "--stages", "stage1_basic", "--p-augs", "1", *TINY_RUN),
         ("SQLite", "one worker", "journal")),
    Case("several SQLite workers on the study", ("study", "--quick", "--workers", "2", "--storage",
                                                 "sqlite:///{root}/q.db"), ("SQLite", "one worker")),
]

TRACEBACK_CASES = [
    Case("report with a NaN macro-F1", ("summary",), ("received.json", "test.f1_macro", "finite"), status=0,
         prepare=tampered("test.f1_macro", float("nan")), writes=("reports/summary.*",)),
    Case("report with a string macro-F1", ("figures",), ("received.json", "test.f1_macro"), status=0,
         prepare=tampered("test.f1_macro", "0.9"), writes=("reports/figures/*.png",)),
    Case("report with a non-digit prediction", ("summary",), ("received.json", "test_predictions", "0-9"), status=0,
         prepare=lambda tree: tampered("test_predictions", "x" + tree.report()["test_predictions"][1:])(tree),
         writes=("reports/summary.*",)),
    Case("report with a prediction short by one", ("summary",), ("received.json", "test_predictions", "99 labels"),
         status=0, prepare=lambda tree: tampered("test_predictions", tree.report()["test_predictions"][1:])(tree),
         writes=("reports/summary.*",)),
    Case("report with an empty history", ("figures",), ("received.json", "'history'", "non-empty"), status=0,
         prepare=tampered("history", []), writes=("reports/figures/*.png",)),
    Case("report with p_aug as a word", ("summary",), ("received.json", "config.p_aug"), status=0,
         prepare=tampered("config.p_aug", "half"), writes=("reports/summary.*",)),
    Case("malformed report", ("summary",), ("broken.json", "cannot be read"), status=0,
         prepare=lambda tree: (tree.reports / "runs" / "broken.json").write_text('{"schema_version": 2, "run_id": '),
         writes=("reports/summary.*",)),
    Case("report without its test metrics", ("summary",), ("received.json", "'test'", "missing"), status=0,
         prepare=without("test"), writes=("reports/summary.*",)),
    Case("model file holding a forged pickle", ("run", "--teacher", "{teacher}", "--kd-alpha", "0.5", *TINY_RUN),
         ("not a model this library wrote",), prepare=forged_model),
    Case("a file-size limit while training", keywords=("checkpoints", "file-size limit", "MB free"), status=2,
         call=efbig_run, writes=("models/checkpoints/*", "reports/runs/*.metrics.csv", "reports/tensorboard/**")),
]

DIAGNOSIS_CASES = [
    Case("plain postgresql URL", ("status", "--storage", f"postgresql://alice:{SECRET}@127.0.0.1:9/db"),
         ("postgresql+psycopg2://", "***")),
    Case("plain mysql URL", ("status", "--storage", f"mysql://alice:{SECRET}@127.0.0.1:9/db"),
         ("mysql+pymysql://", "***")),
    Case("MATLAB v7.3 file", ("run", "--dataset", "svhn", *TINY_RUN), ("train_32x32.mat", "v7.3", "-v7"),
         prepare=matlab_v73_file),
    Case("labels out of range", ("run", "--dataset", "svhn", *TINY_RUN), ("train_32x32.mat", "are 0, 11"),
         prepare=labels_out_of_range),
]

CASES = NAME_CASES + SILENT_WRONG_CASES + TRACEBACK_CASES + DIAGNOSIS_CASES


# ---------------------------------------------------------------- running the table


def listing(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``root`` (hidden ones included): its content hash and modification time."""
    return {str(path.relative_to(root)): (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
            for path in sorted(root.rglob("*")) if path.is_file() or path.is_symlink()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_data_dir) -> tuple[Path, str, str]:
    """A project with two finished runs, a baseline and an augmented cell (so `figures` draws a family);
    the baseline's run id and the clean tree's summary (what a table of the sound reports must print
    whatever bad report sits beside them)."""
    project = tmp_path_factory.mktemp("finished")
    with pytest.MonkeyPatch.context() as patch:
        _point_config(patch, project, tiny_data_dir)
        base = config.preset_config("original", n_train=100, n_test=100, epochs=1)
        report = runs.run(base, severities=(), quiet=True)
        runs.run(dataclasses.replace(base, stage="stage1_basic", p_aug=0.5), severities=(), quiet=True)
        markdown, _ = reports.write_summary()
    (project / "reports" / "summary.md").unlink()
    (project / "reports" / "summary.csv").unlink()
    return project, report["run_id"], markdown


def _point_config(patch: pytest.MonkeyPatch, project: Path, data: Path) -> None:
    for name, path in (("DATA_DIR", data), ("MODELS_DIR", project / "models"), ("REPORTS_DIR", project / "reports"),
                       ("RUNS_DIR", project / "reports" / "runs"), ("FIGURES_DIR", project / "reports" / "figures")):
        patch.setattr(config, name, path)


def make_tree(root: Path, finished, data: Path) -> Tree:
    source, teacher, _ = finished
    tree = Tree(root, data, teacher)
    for folder in ("reports", "models"):
        shutil.copytree(source / folder, tree.project / folder)
    tree.elsewhere.mkdir()
    (tree.elsewhere / "notes.txt").write_text("a file of someone else's\n")
    (root / "cwd").mkdir()
    return tree


def run_case(case: Case, tree: Tree, capsys, monkeypatch) -> dict:
    """Run the case in this process; its exit status (None: a library call), its output and the tree
    listed before and after."""
    fill = {"root": str(tree.root), "teacher": tree.teacher}
    if case.prepare is not None:
        case.prepare(tree)
    _point_config(monkeypatch, tree.project, tree.data)
    monkeypatch.chdir(tree.root / "cwd")
    before, data_before = listing(tree.root), listing(Path(config.DATA_DIR))
    capsys.readouterr()
    status, message = None, None
    try:
        if case.call is not None:
            case.call(tree)
            message = "(no error)"
        else:
            status = experiments.main([arg.format(**fill) for arg in case.argv])
    except SystemExit as exit_:
        status = exit_.code
    except Exception as err:  # the library's own errors (and warnings raised as errors) end in one line
        if not isinstance(err, UserWarning) and not experiments.is_expected_error(err):
            raise
        message = str(err)
    out = capsys.readouterr()
    return {"status": status, "message": message, "stdout": out.out, "stderr": out.err,
            "before": before, "after": listing(tree.root), "data_before": data_before,
            "data_after": listing(Path(config.DATA_DIR)), "keywords": [k.format(**fill) for k in case.keywords]}


def the_line(case: Case, out: dict) -> str:
    """The one line that must name the problem."""
    if case.status is None:
        return out["message"]
    lines = [line for line in out["stderr"].splitlines() if line.strip()]
    wanted = "warning: left out" if case.status == 0 else "error: "
    found = [line for line in lines if line.startswith(wanted)]
    assert len(found) == 1, f"expected one {wanted!r} line:\n{out['stderr'][-3000:]}"
    if case.status != 0:
        assert lines[-1] == found[0], f"the error is not the last line:\n{out['stderr'][-3000:]}"
    return found[0]


def changes(case: Case, tree: Tree, out: dict) -> tuple[list[str], list[str]]:
    """(files changed or created outside what the case may write, the same for the shared data)."""
    project = str(tree.project.relative_to(tree.root))
    touched = [path for path in out["before"].keys() | out["after"].keys()
               if out["before"].get(path) != out["after"].get(path)]
    allowed = [f"{project}/{pattern}" for pattern in case.writes]
    wrong = [path for path in touched if not any(fnmatch(path, pattern) for pattern in allowed)]
    shared = [path for path in out["data_before"].keys() | out["data_after"].keys()
              if out["data_before"].get(path) != out["data_after"].get(path) and tree.data != tree.project / "data"]
    return sorted(wrong), sorted(shared)


def _param(case: Case):
    return pytest.param(case, id=case.name.replace(" ", "-"))


def test_the_table_covers_the_catalogue():
    assert len(CASES) >= 30 and len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", [_param(case) for case in CASES])
def test_hostile_input_is_one_line_and_writes_nothing_outside(case, finished, tiny_data_dir, tmp_path, capsys,
                                                              monkeypatch):
    tree = make_tree(tmp_path, finished, tiny_data_dir)
    out = run_case(case, tree, capsys, monkeypatch)
    shown = f"status {out['status']}\nstdout:\n{out['stdout'][-2000:]}\nstderr:\n{out['stderr'][-3000:]}"
    assert "Traceback" not in out["stdout"] + out["stderr"], shown
    assert out["status"] == case.status, shown
    line = the_line(case, out)
    missing = [word for word in out["keywords"] if word not in line]
    assert not missing, f"the line does not name {missing}: {line}"
    assert "\n" not in line and SECRET not in out["stdout"] + out["stderr"] + line, shown
    assert "weights_only=False" not in out["stdout"] + out["stderr"] + line
    wrong, shared = changes(case, tree, out)
    assert not wrong, f"files created or changed where the case may not write: {wrong}\n{shown}"
    assert not shared, f"the shared data changed: {shared}"
    if case.status == 0 and case.argv == ("summary",):  # the sound reports, summarized as if alone
        assert out["stdout"].rsplit("\nCSV: ", 1)[0] == finished[2], shown
    if case.status == 0 and case.argv == ("figures",):
        assert len(list((tree.reports / "figures").glob("*.png"))) == len(out["stdout"].split()) > 0, shown


# ---------------------------------------------------------------- flags, environment and interruptions


def test_an_empty_path_variable_is_an_error_naming_it(finished, tiny_data_dir, tmp_path):
    """In a fresh process: the variable is read when config is imported."""
    tree = make_tree(tmp_path, finished, tiny_data_dir)
    before = listing(tree.root)
    env = {**os.environ, "SVHN_AUG_DATA_DIR": "", "SVHN_AUG_MODELS_DIR": str(tree.models),
           "SVHN_AUG_REPORTS_DIR": str(tree.reports), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(config.ROOT / "experiments.py"), "run", *TINY_RUN], env=env,
                          cwd=tree.root / "cwd", capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert lines[-1].startswith("error: ") and "SVHN_AUG_DATA_DIR" in lines[-1] and "empty" in lines[-1], done.stderr
    assert listing(tree.root) == before


def test_ctrl_c_during_run_says_what_was_kept_and_how_to_resume(finished, tiny_data_dir, tmp_path, capsys,
                                                                 monkeypatch):
    """A real SIGINT right after the first epoch's metrics are written."""
    tree = make_tree(tmp_path, finished, tiny_data_dir)
    _point_config(monkeypatch, tree.project, tree.data)
    monkeypatch.setattr(training, "write_metrics_csv", interrupt_self_after(training, "write_metrics_csv"))
    argv = ["run", "--seed", "5", "--epochs", "3", "--n-train", "100", "--n-test", "100", "--quiet", "--severities"]
    assert experiments.main(argv) == 130
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines[-1].startswith("interrupted (Ctrl-C): "), err
    assert lines[-1].endswith("resume with: python experiments.py " + " ".join(argv)), err
    assert len(list((tree.models / "checkpoints").glob("*.ckpt"))) == 1  # the epoch that finished
    assert not [p for p in tree.root.rglob(".*.tmp")]


def test_ctrl_c_during_grid_and_figures_is_one_line(finished, tiny_data_dir, tmp_path, capsys, monkeypatch):
    tree = make_tree(tmp_path, finished, tiny_data_dir)
    _point_config(monkeypatch, tree.project, tree.data)
    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "run", interrupt_self_after(pipeline, "run"))  # the cell's run returns, then ^C
        status = experiments.main(["grid", "--stages", "stage1_basic", "--p-augs", "0", "--seeds", "42", "--quiet",
                                   "--n-train", "100", "--n-test", "100", "--epochs", "1", "--severities"])
    err = capsys.readouterr().err
    assert status == 130 and "Traceback" not in err and err.strip().splitlines()[-1].startswith(
        "interrupted (Ctrl-C): finished runs keep their reports"), err
    with monkeypatch.context() as patch:
        patch.setattr(reports, "save_and_close", interrupt_self_after(reports, "save_and_close"))
        status = experiments.main(["figures"])
    err = capsys.readouterr().err
    assert status == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == ("interrupted (Ctrl-C): every figure already written is complete; "
                                            "resume with: python experiments.py figures")
    assert not [p for p in tree.root.rglob(".*.tmp")]


def test_sigterm_during_run_leaves_no_temporary_file(finished, tiny_data_dir, tmp_path):
    """A real process, stopped with SIGTERM while it trains (each epoch rewrites the metrics CSV)."""
    tree = make_tree(tmp_path, finished, tiny_data_dir)
    env = {**os.environ, "SVHN_AUG_DATA_DIR": str(tree.data), "SVHN_AUG_MODELS_DIR": str(tree.models),
           "SVHN_AUG_REPORTS_DIR": str(tree.reports), "OMP_NUM_THREADS": "1"}
    argv = ["run", "--seed", "6", "--epochs", "1000", "--n-train", "100", "--n-test", "100", "--quiet", "--severities"]
    process = subprocess.Popen([sys.executable, str(config.ROOT / "experiments.py"), *argv], env=env,
                               cwd=tree.root / "cwd", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list((tree.reports / "runs").glob("*-s6-*.metrics.csv")) and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    time.sleep(0.3)  # a few epochs in
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert process.returncode == 143 and "Traceback" not in err, err
    assert lines[-1].startswith("interrupted (SIGTERM): the run's finished epochs are kept in its checkpoint; "
                                "resume with: python experiments.py run"), err
    assert not [p for p in tree.root.rglob("*.tmp")]
    assert len(list((tree.models / "checkpoints").glob("*-s6-*.ckpt"))) == 1
