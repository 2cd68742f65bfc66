"""Bad inputs and faults through the command line, each run as a user would run it.

Every case must end with a non-zero exit status, stderr's last line ``error: ...`` naming the problem,
no traceback anywhere, and every file already written (reports, models, data) unchanged. A case runs
through ``experiments.main`` in this process (its folders and environment set as a process would
have them, stdout and stderr captured, an escaping exception printed as a process would print it);
a case that needs a real process (``process``) runs ``python experiments.py`` in one.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

import config
import experiments
import reports
import runs
import work_queue

CASE_TIMEOUT_S = 180  # a case that waits for a network or trains by mistake fails instead of hanging
PARALLEL_CASES = 4
# Small sizes on every training command, so a check that is missing shows as a quick wrong success.
TINY_RUN = ("--n-train", "100", "--n-test", "100", "--epochs", "1")


@dataclasses.dataclass
class Tree:
    """One case's folders: its own copy of a finished reports/models tree, and the data it reads."""

    root: Path
    data: Path
    teacher: str  # run id of the finished run in the copied tree

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def models(self) -> Path:
        return self.root / "models"

    def overrides(self) -> dict[str, str]:
        """The environment variables a case runs with, on top of this process's (no_proxy removed)."""
        # The proxy points at a closed port: a download that is attempted fails at once, never fetches.
        proxy = "http://127.0.0.1:9"
        return {"SVHN_AUG_DATA_DIR": str(self.data), "SVHN_AUG_MODELS_DIR": str(self.models),
                "SVHN_AUG_REPORTS_DIR": str(self.reports), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg",
                "http_proxy": proxy, "https_proxy": proxy, "HTTP_PROXY": proxy, "HTTPS_PROXY": proxy}

    def env(self) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if key.lower() != "no_proxy"}
        return {**env, **self.overrides()}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    args: tuple[str, ...]  # "{root}" and "{teacher}" are filled in from the case's Tree
    keywords: tuple[str, ...]  # each must appear in the error line
    prepare: Callable[[Tree], None] | None = None
    may_create: tuple[str, ...] = ()  # globs (relative to the case's root) of files the case may create
    xfail: str | None = None
    skip: str | None = None
    process: str | None = None  # why the case needs a process of its own (default: run in this one)


# ---------------------------------------------------------------- how cases damage their tree


def run_args(*extra: str) -> tuple[str, ...]:
    """``run`` at tiny sizes, no corruption evaluation; ``extra`` comes last so it wins."""
    return ("run", *TINY_RUN, *extra, "--severities")


def own_data(tree: Tree) -> Path:
    """Give the case a data folder of its own (a copy of the shared synthetic data)."""
    shared = tree.data
    tree.data = tree.root / "data"
    shutil.copytree(shared, tree.data)
    return tree.data


def empty_data(tree: Tree) -> None:
    tree.data = tree.root / "data"
    tree.data.mkdir()


def truncated_synthetic_mat(tree: Tree) -> None:
    path = own_data(tree) / "synthetic" / "train_32x32.mat"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def svhn_mat_with_other_names(tree: Tree) -> None:
    empty_data(tree)
    raw = tree.data / "raw"
    raw.mkdir()
    scipy.io.savemat(raw / "train_32x32.mat", {"images": np.zeros((32, 32, 3, 20), np.uint8),
                                               "labels": np.ones((20, 1), np.uint8)})


def reports_folder_is_a_file(tree: Tree) -> None:
    shutil.rmtree(tree.reports)
    tree.reports.write_text("a file where the reports folder should be\n")


def models_folder_is_a_file(tree: Tree) -> None:
    shutil.rmtree(tree.models)
    tree.models.write_text("a file where the models folder should be\n")


def read_only_reports(tree: Tree) -> None:
    for folder in (tree.reports, tree.reports / "runs"):
        folder.chmod(0o555)


def text_file(tree: Tree) -> None:
    (tree.root / "notes.txt").write_text("my notes, not a queue\n")


def no_runs(tree: Tree) -> None:
    for path in (tree.reports / "runs").glob("*.json"):
        path.unlink()


def no_runs_but(name: str) -> Callable[[Tree], None]:
    def prepare(tree: Tree) -> None:
        for path in (tree.reports / "runs").glob("*.json"):
            if path.name != name:
                path.unlink()

    return prepare


def malformed_report(tree: Tree) -> None:
    (tree.reports / "runs" / "broken.json").write_text('{"schema_version": 1, "run_id": ')


def report_without(dotted: str) -> Callable[[Tree], None]:
    def prepare(tree: Tree) -> None:
        report = json.loads((tree.reports / "runs" / f"{tree.teacher}.json").read_text())
        *outer, last = dotted.split(".")
        holder = report
        for name in outer:
            holder = holder[name]
        del holder[last]
        (tree.reports / "runs" / "partial.json").write_text(json.dumps(report))

    return prepare


def truncated_teacher_model(tree: Tree) -> None:
    path = tree.models / f"{tree.teacher}.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# ---------------------------------------------------------------- the table

CONFIG_CASES = [
    Case("n_train below the minimum", run_args("--n-train", "5"), ("n_train", "at least 100"),
         process="the entry point itself: a library error's exit status and stderr in a real process"),
    Case("n_train zero", run_args("--n-train", "0"), ("n_train",)),
    Case("negative seed", run_args("--seed", "-1"), ("seed", "non-negative")),
    Case("fractional epochs", run_args("--epochs", "1.5"), ("--epochs", "1.5")),
    Case("eval batch size zero", run_args("--eval-batch-size", "0"), ("eval_batch_size",)),
    Case("batch size zero", run_args("--batch-size", "0"), ("batch_size",)),
    Case("negative momentum", run_args("--momentum", "-1"), ("momentum",)),
    Case("negative workers", run_args("--num-workers", "-1"), ("num_workers",)),
    Case("p_aug above 1", run_args("--p-aug", "1.5"), ("p_aug", "[0, 1]")),
    Case("p_aug nan", run_args("--p-aug", "nan"), ("p_aug", "finite number", "nan")),
    Case("zero learning rate", run_args("--lr", "0"), ("lr must be positive",)),
    Case("label smoothing 1", run_args("--label-smoothing", "1"), ("label_smoothing",)),
    Case("validation fraction 0", run_args("--val-fraction", "0"), ("val_fraction",)),
    Case("kd_alpha above 1", run_args("--kd-alpha", "2"), ("kd_alpha",)),
]

CHOICE_CASES = [
    Case("unknown stage", run_args("--stage", "nope"), ("--stage", "invalid choice", "nope"),
         process="the entry point itself: a usage error's exit status and stderr in a real process"),
    Case("unknown model", run_args("--model", "vgg"), ("--model", "vgg")),
    Case("unknown optimizer", run_args("--optimizer", "rmsprop"), ("--optimizer", "rmsprop")),
    Case("grid with an unknown stage", ("grid", "--stages", "nope"), ("--stages", "nope")),
    Case("grid with an unknown model", ("grid", "--models", "vgg"), ("--models", "vgg")),
]

COUNT_CASES = [
    Case("tune with no trials", ("tune", "--n-trials", "0"), ("--n-trials", "at least 1")),
    Case("tune with zero-epoch trials", ("tune", "--trial-epochs", "0"), ("--trial-epochs",)),
    Case("worker heartbeat zero", ("worker", "--heartbeat", "0"), ("--heartbeat", "above 0")),
    Case("grid with no workers", ("grid", "--workers", "0"), ("--workers", "at least 1")),
    Case("study with no workers", ("study", "--workers", "0"), ("--workers",)),
    Case("presets n_train below the minimum", ("presets", "--n-train", "5"), ("n_train",)),
]

DATA_AND_DEVICE_CASES = [
    Case("SVHN missing offline", ("run", "--dataset", "svhn", *TINY_RUN), ("SVHN", "not found", "synthetic"),
         prepare=empty_data),
    Case("truncated .mat", run_args(), ("train_32x32.mat",), prepare=truncated_synthetic_mat),
    Case(".mat with other variable names", ("run", "--dataset", "svhn", *TINY_RUN), ("train_32x32.mat", "X"),
         prepare=svhn_mat_with_other_names),
    Case("CUDA on a machine without it", run_args("--device", "cuda"), ("cuda", "not available"),
         skip="this machine has CUDA" if torch.cuda.is_available() else None),
    Case("unknown device", run_args("--device", "tpu"), ("tpu",)),
    Case("reports folder is a file", run_args("--seed", "7"), ("cannot write", "reports"),
         prepare=reports_folder_is_a_file),
    Case("models folder is a file", run_args("--seed", "7"), ("cannot write", "models"),
         prepare=models_folder_is_a_file),
    Case("reports folder read-only", run_args("--seed", "7"), ("cannot write",), prepare=read_only_reports,
         skip="root ignores file permissions" if os.geteuid() == 0 else None),
]

QUEUE_AND_REPORT_CASES = [
    Case("summary of a missing folder", ("summary", "--source", "missing/path"), ("missing/path",)),
    Case("summary of no runs", ("summary",), ("no finished runs",), prepare=no_runs),
    Case("figures of a missing folder", ("figures", "--source", "missing/path"), ("missing/path",)),
    Case("status of a text file", ("status", "--storage", "{root}/notes.txt"), ("notes.txt", "not an Optuna journal"),
         prepare=text_file),
    Case("worker on a text file", ("worker", "--storage", "{root}/notes.txt"), ("notes.txt",), prepare=text_file),
    Case("grid into a missing folder", ("grid", *TINY_RUN, "--stages", "stage1_basic", "--p-augs", "1",
                                        "--storage", "{root}/nowhere/queue.journal", "--severities"),
         ("nowhere", "does not exist")),
    Case("database on a closed port", ("status", "--storage", "postgresql+psycopg2://nobody@127.0.0.1:9/none"),
         ("cannot reach", "127.0.0.1")),
    Case("status of a missing queue", ("status", "--study", "nosuch"), ("nosuch",)),
    Case("summary of only a malformed report", ("summary",), ("no finished runs",),
         prepare=lambda tree: (no_runs(tree), malformed_report(tree))),
    Case("figures of only a report without its model name", ("summary",), ("no finished runs",),
         prepare=lambda tree: (report_without("config.model")(tree), no_runs_but("partial.json")(tree))),
]

TEACHER_CASES = [
    Case("distill a missing teacher", ("distill", "--teacher", "nonexistent", "--severities"), ("nonexistent",)),
    Case("distill the best of no runs", ("distill", "--teacher", "best", "--severities"), ("no finished",),
         prepare=no_runs),
    Case("distill a teacher with a truncated model", ("distill", "--teacher", "{teacher}", "--severities"),
         ("{teacher}.pt", "does not match"), prepare=truncated_teacher_model),
    Case("distill at zero temperature", ("distill", "--teacher", "{teacher}", "--temperature", "0", "--severities"),
         ("kd_temperature",)),
    Case("distill with alpha above 1", ("distill", "--teacher", "{teacher}", "--alpha", "2", "--severities"),
         ("kd_alpha",)),
    Case("run from a missing teacher", run_args("--teacher", "nonexistent"), ("nonexistent", "train it first")),
]

CASES = CONFIG_CASES + CHOICE_CASES + COUNT_CASES + DATA_AND_DEVICE_CASES + QUEUE_AND_REPORT_CASES + TEACHER_CASES


# ---------------------------------------------------------------- running the table


def snapshot(*folders: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folders``: its content hash and modification time."""
    files = {}
    for folder in folders:
        paths = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
        for path in paths:
            files[str(path)] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
    return files


@pytest.fixture(scope="session")
def finished_tree(tmp_path_factory, tiny_data_dir) -> tuple[Path, str]:
    """A reports/models tree with one finished run, its summary, and a journal holding a queue."""
    root = tmp_path_factory.mktemp("finished")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(config, "DATA_DIR", tiny_data_dir)
        patch.setattr(config, "MODELS_DIR", root / "models")
        patch.setattr(config, "REPORTS_DIR", root / "reports")
        patch.setattr(config, "RUNS_DIR", root / "reports" / "runs")
        patch.setattr(config, "FIGURES_DIR", root / "reports" / "figures")
        cfg = config.preset_config("original", dataset="synthetic", n_train=100, n_test=100, epochs=1)
        report = runs.run(cfg, severities=(), quiet=True)
        reports.write_summary(reports.load_reports())
        storage = work_queue.open_storage(root / "reports" / "optuna.journal")
        work_queue.enqueue_cells(storage, reports.DEFAULT_QUEUE_NAME, [{"cell_key": "a", "config": {}}])
    return root, report["run_id"]


def run_case(case: Case, tree: Tree) -> dict:
    """Run the case's command; return its status, output and the files before and after."""
    fill = {"root": str(tree.root), "teacher": tree.teacher}
    args = [arg.format(**fill) for arg in case.args]
    watched = (tree.root, tree.data)
    before = snapshot(*watched)
    status, stdout, stderr = (run_in_a_process if case.process else run_in_this_process)(args, tree)
    return {"args": args, "status": status, "stdout": stdout, "stderr": stderr, "before": before,
            "after": snapshot(*watched), "keywords": [k.format(**fill) for k in case.keywords]}


def run_in_a_process(args: list[str], tree: Tree) -> tuple[int | None, str, str]:
    command = [sys.executable, str(config.ROOT / "experiments.py"), *args]
    try:
        done = subprocess.run(command, cwd=config.ROOT, env=tree.env(), capture_output=True, text=True,
                              timeout=CASE_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        return None, str(err.stdout), str(err.stderr)
    return done.returncode, done.stdout, done.stderr


def run_in_this_process(args: list[str], tree: Tree) -> tuple[int, str, str]:
    """``experiments.main(args)`` with the case's folders and environment, as ``python experiments.py``
    would run it: an exception that escapes main is printed with its traceback (status 1)."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        for name in ("no_proxy", "NO_PROXY"):
            patch.delenv(name, raising=False)
        for name, value in tree.overrides().items():
            patch.setenv(name, value)
        for name, path in (("DATA_DIR", tree.data), ("MODELS_DIR", tree.models), ("REPORTS_DIR", tree.reports),
                           ("RUNS_DIR", tree.reports / "runs"), ("FIGURES_DIR", tree.reports / "figures")):
            patch.setattr(config, name, path)
        try:
            status = experiments.main(args)
        except SystemExit as exit_:  # usage errors leave through argparse's exit
            status = exit_.code
        except BaseException:
            traceback.print_exc()
            status = 1
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def outcomes(finished_tree, tiny_data_dir, tmp_path_factory) -> dict[str, dict]:
    """Every case of the table, each in its own copy of the finished tree: cases in this process one
    after another, cases that need a process of their own concurrently with them."""
    source, teacher = finished_tree
    trees = {}
    for index, case in enumerate(c for c in CASES if c.skip is None):
        root = tmp_path_factory.mktemp(f"case{index}")
        for name in ("reports", "models"):
            shutil.copytree(source / name, root / name)
        tree = Tree(root, tiny_data_dir, teacher)
        if case.prepare is not None:
            case.prepare(tree)
        trees[case.name] = (case, tree)
    with ThreadPoolExecutor(PARALLEL_CASES) as pool:
        futures = {name: pool.submit(run_case, case, tree) for name, (case, tree) in trees.items() if case.process}
        results = {name: run_case(case, tree) for name, (case, tree) in trees.items() if not case.process}
        return {**results, **{name: future.result() for name, future in futures.items()}}


def _param(case: Case):
    marks = [pytest.mark.skip(reason=case.skip)] if case.skip else []
    marks += [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
    return pytest.param(case, id=case.name.replace(" ", "-"), marks=marks)


def test_the_table_has_enough_cases():
    assert len(CASES) >= 40 and len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", [_param(case) for case in CASES])
def test_bad_input_fails_on_one_line_and_changes_nothing(case, outcomes):
    out = outcomes[case.name]
    shown = f"{out['args']}\nstdout:\n{out['stdout'][-2000:]}\nstderr:\n{out['stderr'][-3000:]}"
    assert out["status"] is not None, f"no answer within {CASE_TIMEOUT_S} s: {shown}"
    assert out["status"] != 0, shown
    assert "Traceback" not in out["stdout"] + out["stderr"], shown
    assert "usage:" not in out["stderr"], shown
    lines = [line for line in out["stderr"].splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), shown
    missing = [word for word in out["keywords"] if word not in lines[-1]]
    assert not missing, f"the error line does not name {missing}: {lines[-1]}"
    changed = [path for path, stamp in out["before"].items() if out["after"].get(path) != stamp]
    assert not changed, f"files changed or removed: {changed}\n{shown}"
    created = [path for path in out["after"].keys() - out["before"].keys()
               if not any(fnmatch(path, f"*/{pattern}") for pattern in case.may_create)]
    assert not created, f"files created: {created}\n{shown}"


# ---------------------------------------------------------------- more, in this process

# Bad inputs that need no prepared files: through experiments.main in this process, the command line's
# code path without a process start for each.
MORE_BAD_INPUTS = [
    (run_args("--n-test", "5"), "n_test"),
    (run_args("--seed", "abc"), "--seed"),
    (run_args("--weight-decay", "-1"), "weight_decay"),
    (run_args("--kd-temperature", "0"), "kd_temperature"),
    (run_args("--preset", "fancy"), "--preset"),
    (run_args("--scheduler", "step"), "--scheduler"),
    (("run", *TINY_RUN, "--severities", "4"), "--severities"),
    (run_args("--bogus"), "--bogus"),
    ((), "command"),
    (("train",), "'train'"),
    (("grid", *TINY_RUN, "--stages", "stage1_basic", "--p-augs", "1.5", "--severities"), "p_aug"),
    (("grid", *TINY_RUN, "--stages", "stage1_basic", "--seeds", "-1", "--severities"), "seed"),
    (("distill", "--student", "vgg"), "--student"),
    (("eda", "--dataset", "mnist"), "--dataset"),
    (("tune", "--n-trials", "many"), "--n-trials"),
    (("worker", "--heartbeat", "nan"), "--heartbeat"),
    (("study", "--heartbeat", "-5"), "--heartbeat"),
    (("presets", "--epochs", "0", "--n-train", "100"), "epochs"),
    (("tune", "--stage", "stage1_basic", "--device", "tpu"), "tpu"),
    (("summary", "--source", "nothing.journal"), "nothing.journal"),
    (("worker", "--storage", "missing-folder/queue.journal"), "missing-folder"),
    (("grid", *TINY_RUN, "--stages", "stage1_basic", "--no-top-up", "--seeds-max", "4"), "--no-top-up"),
    (("study", "--seeds-max", "1"), "--seeds-max"),
    (("grid", "--min-effect", "0"), "--min-effect"),
    # Flags that contradict each other, or would be silently ignored
    (run_args("--kd-alpha", "0.5"), "--teacher"),
    (run_args("--kd-temperature", "2"), "--teacher"),
    (run_args("--no-hflip", "--stage", "randaugment", "--p-aug", "1"), "--no-hflip"),
    (run_args("--no-hflip"), "--no-hflip"),
    (run_args("--stage", "none", "--p-aug", "0.7"), "--p-aug 0.7"),
    (run_args("--p-aug", "0.5"), "--stage"),
    (run_args("--stage", "stage3_color"), "--p-aug"),
    (run_args("--num-workers", "64"), "--loader torch"),
    (run_args("--momentum", "0.5"), "--optimizer sgd"),
    (("grid", *TINY_RUN, "--no-hflip", "--stages", "autoaugment_svhn", "randaugment", "--severities"), "--no-hflip"),
    (("tune", "--stage", "stage1_basic", "--p-aug", "0.5"), "tune searches p_aug"),
    (("tune", "--n-trials", "1"), "--stage"),
]


@pytest.mark.parametrize("argv, keyword", MORE_BAD_INPUTS, ids=[" ".join(a[-3:]) for a, _ in MORE_BAD_INPUTS])
def test_more_bad_inputs_fail_on_one_line(argv, keyword, project_dirs, capsys):
    try:
        status = experiments.main(list(argv))
    except SystemExit as exit_:  # usage errors leave through argparse's exit
        status = exit_.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and lines and lines[-1].startswith("error: "), err
    assert keyword in lines[-1] and "Traceback" not in err and "usage:" not in err, err
    assert not list(project_dirs.rglob("*.json")) and not list(project_dirs.rglob("*.pt"))


# ---------------------------------------------------------------- every --help


def subcommand_parsers() -> dict[str, experiments.OneLineErrorParser]:
    parser = experiments.build_parser()
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {"(main)": parser, **subparsers.choices}


def flag_help(parser, action) -> str:
    return parser.formatter_class(parser.prog)._get_help_string(action) or ""


@pytest.mark.parametrize("name", list(subcommand_parsers()))
def test_every_flag_has_help_that_shows_its_default(name):
    parser = subcommand_parsers()[name]
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        text = flag_help(parser, action)
        assert text.strip(), f"{name} {action.option_strings[0]} has no help"
        assert "default" in text, f"{name} {action.option_strings[0]}: help shows no default: {text!r}"
    assert "default" in parser.format_help()


@pytest.mark.parametrize("name", [name for name in subcommand_parsers() if name != "(main)"])
def test_every_choice_is_enforced(name, capsys):
    parser = subcommand_parsers()[name]
    chosen = [action for action in parser._actions if action.choices and action.option_strings]
    for action in chosen:
        bad = "99" if action.type is int else "no-such-choice"  # a value of the right type, not a choice
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args([action.option_strings[0], bad])
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "invalid choice" in err, err
        assert action.option_strings[0] in err and f"{name} --help" in err, err
