"""The work queue on a journal file and on a real PostgreSQL server, with real worker processes."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.trial import TrialState

import config
import work_queue as wq
from atomic_io import atomic_write_json
from tests.pg import DATABASE, postgres_url  # noqa: F401  (fixture, requested through the `storage_url` fixture)

REPO = Path(__file__).resolve().parents[1]
HEARTBEAT, GRACE = 0.5, 2.0  # seconds: short, so a dead worker's cell is retried within seconds
N_CELLS, N_WORKERS = 9, 3


def _cells() -> list[dict]:
    return [{"stage": f"stage{i % 3}", "p_aug": i / 10, "seed": i} for i in range(N_CELLS)]


def _key(cell: dict) -> str:
    return f"{cell['stage']}-p{cell['p_aug']}-s{cell['seed']}"


@pytest.fixture(params=["journal", "postgres"])
def storage_url(request, tmp_path) -> str:
    """A storage URL for each backend; PostgreSQL starts only for the tests that use it."""
    if request.param == "journal":
        return str(tmp_path / "queue.journal")
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def study_name() -> str:
    return f"grid-{uuid.uuid4().hex[:8]}"  # the PostgreSQL database is shared by the session


# --- the worker process: a dummy training run per cell ------------------------------------------


def _dummy_execute(out_dir: Path, slow_key: str | None):
    """A cell: log its start, sleep, write its output atomically; ``slow_key`` hangs on its first try."""

    def execute(cell: dict) -> dict:
        key = _key(cell)
        started = out_dir / "started" / f"{key}.log"
        first_try = not started.exists()
        with open(started, "a") as log:
            log.write(f"{os.getpid()}\n")
        if key == slow_key and first_try:
            (out_dir / "slow-started").touch()
            time.sleep(120)  # killed here
        time.sleep(0.3)
        atomic_write_json(out_dir / "outputs" / f"{key}.json", {"key": key, "pid": os.getpid()})
        return {"key": key, "pid": os.getpid(), "value": cell["seed"]}

    return execute


def _worker_main(argv: list[str]) -> None:
    url, study_name, out_dir, slow_key = argv
    wq.run_worker(url, study_name, _dummy_execute(Path(out_dir), slow_key or None), value_key="value",
                  heartbeat_interval=HEARTBEAT, grace_period=GRACE)


def _start_workers(url: str, study_name: str, out_dir: Path, slow_key: str = "") -> list[subprocess.Popen]:
    (out_dir / "started").mkdir(parents=True)
    (out_dir / "outputs").mkdir()
    code = "import sys; from tests.test_work_queue import _worker_main; _worker_main(sys.argv[1:])"
    return [subprocess.Popen([sys.executable, "-c", code, url, study_name, str(out_dir), slow_key], cwd=REPO)
            for _ in range(N_WORKERS)]


def _wait_for(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.05)


def _started_counts(out_dir: Path) -> dict[str, int]:
    return {p.stem: len(p.read_text().splitlines()) for p in (out_dir / "started").glob("*.log")}


def _check_outputs_and_reports(url: str, study_name: str, out_dir: Path) -> list[optuna.trial.FrozenTrial]:
    """Every cell: one complete, readable output file and exactly one COMPLETE trial with its report."""
    keys = sorted(_key(c) for c in _cells())
    outputs = sorted((out_dir / "outputs").iterdir())
    assert [p.name for p in outputs] == [f"{k}.json" for k in keys]  # no temporary leftovers
    assert [json.loads(p.read_text())["key"] for p in outputs] == keys
    assert sorted(r["key"] for r in wq.reports_from_storage(url, study_name)) == keys
    trials = optuna.load_study(study_name=study_name, storage=wq.open_storage(url)).trials
    complete = [t.user_attrs["cell_key"] for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(complete) == keys
    return trials


# --- tests ---------------------------------------------------------------------------------------


def test_enqueue_twice_adds_each_cell_once(storage_url, study_name):
    assert wq.enqueue_cells(storage_url, study_name, _cells(), _key) == N_CELLS
    assert wq.enqueue_cells(storage_url, study_name, _cells() + _cells()[:2], _key) == 0
    extra = {"stage": "stage9", "p_aug": 1.0, "seed": 0}
    assert wq.enqueue_cells(storage_url, study_name, [*_cells(), extra], _key) == 1
    trials = optuna.load_study(study_name=study_name, storage=wq.open_storage(storage_url)).trials
    assert sorted(t.user_attrs["cell_key"] for t in trials) == sorted(map(_key, [*_cells(), extra]))
    assert {t.state for t in trials} == {TrialState.WAITING}
    assert trials[0].user_attrs["cell"] == _cells()[0]


def test_cells_are_keyed_by_their_cell_key_field(tmp_path):
    url = str(tmp_path / "q.journal")
    cells = [{"cell_key": "a", "lr": 0.1}, {"cell_key": "b", "lr": 0.2}]
    assert wq.enqueue_cells(url, "grid", cells + cells[:1]) == 2
    with pytest.raises(wq.QueueError, match="share the key"):
        wq.enqueue_cells(url, "grid", [{"cell_key": "c", "lr": 1}, {"cell_key": "c", "lr": 2}])
    with pytest.raises(wq.QueueError, match="without its key"):
        wq.enqueue_cells(url, "grid", [{"lr": 0.3}])
    wq.run_worker(url, "grid", lambda cell: cell, heartbeat_interval=0.1, grace_period=0.5)
    assert sorted(r["cell_key"] for r in wq.reports_from_storage(url, "grid")) == ["a", "b"]


def test_parallel_workers_run_each_cell_once(storage_url, study_name, tmp_path):
    wq.enqueue_cells(storage_url, study_name, _cells(), _key)
    workers = _start_workers(storage_url, study_name, tmp_path / "run")
    assert [w.wait(timeout=60) for w in workers] == [0] * N_WORKERS
    assert _started_counts(tmp_path / "run") == {_key(c): 1 for c in _cells()}
    trials = _check_outputs_and_reports(storage_url, study_name, tmp_path / "run")
    assert len(trials) == N_CELLS  # no spurious trial, no duplicate
    assert len({t.user_attrs["worker"] for t in trials}) > 1  # the cells were shared out


def test_killed_worker_cell_is_retried(storage_url, study_name, tmp_path):
    out_dir, slow = tmp_path / "run", _key(_cells()[1])
    wq.enqueue_cells(storage_url, study_name, _cells(), _key)
    workers = _start_workers(storage_url, study_name, out_dir, slow_key=slow)
    _wait_for(out_dir / "slow-started", timeout=30)
    victim_pid = int((out_dir / "started" / f"{slow}.log").read_text().split()[0])
    victim = next(w for w in workers if w.pid == victim_pid)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=10) == -signal.SIGKILL
    assert [w.wait(timeout=60) for w in workers if w is not victim] == [0] * (N_WORKERS - 1)

    assert _started_counts(out_dir) == {_key(c): 2 if _key(c) == slow else 1 for c in _cells()}
    trials = _check_outputs_and_reports(storage_url, study_name, out_dir)
    assert len(trials) == N_CELLS + 1  # the killed trial and its retry
    killed = next(t for t in trials if t.state == TrialState.FAIL)
    assert killed.user_attrs["cell_key"] == slow
    assert "no heartbeat" in killed.user_attrs["fail_reason"]
    retry = next(t for t in trials if t.user_attrs.get("retry_of") == killed.number)
    assert (retry.state, retry.user_attrs["retries"], retry.user_attrs["cell"]) == (
        TrialState.COMPLETE, 1, killed.user_attrs["cell"])


@pytest.mark.parametrize("max_retries", [0, 1])
def test_stale_trial_is_retried_up_to_max_retries(tmp_path, max_retries):
    url, name = str(tmp_path / "q.journal"), "grid"
    wq.enqueue_cells(url, name, _cells()[:1], _key)
    optuna.load_study(study_name=name, storage=wq.open_storage(url)).ask()  # a worker claims it and dies
    ran = wq.run_worker(url, name, lambda cell: {"value": 1.0}, value_key="value", heartbeat_interval=0.1,
                        grace_period=0.5, max_retries=max_retries)
    status = wq.queue_status(url, name)
    assert ran == max_retries
    assert status["counts"] == ({"FAIL": 1} if max_retries == 0 else {"FAIL": 1, "COMPLETE": 1})
    if max_retries == 0:
        assert "not retried" in status["failed"][_key(_cells()[0])]


def test_failing_cell_is_recorded_and_can_be_queued_again(tmp_path):
    url, name = str(tmp_path / "q.journal"), "grid"
    wq.enqueue_cells(url, name, _cells()[:3], _key)

    def execute(cell: dict) -> dict:
        if cell["seed"] == 1:
            raise ValueError("diverged")
        return {"key": _key(cell)}

    assert wq.run_worker(url, name, execute, heartbeat_interval=0.1, grace_period=0.5) == 3
    status = wq.queue_status(url, name)
    assert status["counts"] == {"COMPLETE": 2, "FAIL": 1}
    assert status["failed"] == {_key(_cells()[1]): "ValueError: diverged"}
    assert wq.enqueue_cells(url, name, _cells()[:3], _key) == 0
    assert wq.enqueue_cells(url, name, _cells()[:3], _key, retry_failed=True) == 1
    assert wq.enqueue_cells(url, name, _cells()[:3], _key, retry_failed=True) == 0  # it is waiting now


def test_interrupted_worker_queues_its_cell_again(tmp_path):
    url, name = str(tmp_path / "q.journal"), "grid"
    wq.enqueue_cells(url, name, _cells()[:1], _key)

    def execute(cell: dict) -> dict:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        wq.run_worker(url, name, execute, heartbeat_interval=0.1, grace_period=0.5)
    first, retry = optuna.load_study(study_name=name, storage=wq.open_storage(url)).trials
    assert (first.state, retry.state) == (TrialState.FAIL, TrialState.WAITING)
    assert "interrupted" in first.user_attrs["fail_reason"]
    assert (retry.user_attrs["cell"], retry.user_attrs["retry_of"]) == (_cells()[0], first.number)


def test_open_storage_defaults_to_the_journal_in_reports(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "REPORTS_DIR", tmp_path / "reports")
    assert isinstance(wq.open_storage(), JournalStorage)
    assert (tmp_path / "reports" / "optuna.journal").exists()
    assert isinstance(wq.open_storage(f"journal://{tmp_path}/other.journal"), JournalStorage)
    assert (tmp_path / "other.journal").exists()
    with pytest.raises(wq.QueueError, match="sqlite:///"):
        wq.open_storage(tmp_path / "grid.db")


def test_sqlite_worker_warns(tmp_path):
    url = f"sqlite:///{tmp_path}/q.db"
    wq.enqueue_cells(url, "grid", _cells()[:1], _key)
    with pytest.warns(UserWarning, match="one worker"):
        wq.run_worker(url, "grid", lambda cell: {}, heartbeat_interval=0.1, grace_period=0.5)


def test_unreachable_database_fails_fast_with_queue_error():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(wq.QueueError, match="cannot reach the storage database") as error:
        wq.open_storage(f"postgresql+psycopg2://user:secret@127.0.0.1:{port}/grid")
    assert time.monotonic() - start < 10
    assert "secret" not in str(error.value)


def test_missing_study_is_a_queue_error(tmp_path):
    with pytest.raises(wq.QueueError, match="enqueue the cells first"):
        wq.run_worker(str(tmp_path / "q.journal"), "nothing", lambda cell: {})


def test_missing_study_names_the_studies_the_storage_holds(tmp_path):
    url = str(tmp_path / "q.journal")
    wq.enqueue_cells(url, "grid", _cells()[:1], _key)
    with pytest.raises(wq.QueueError, match=r"no study 'gird' in the storage \(it holds 'grid'\)"):
        wq.queue_status(url, "gird")


def test_missing_database_on_a_running_server_is_a_queue_error(request):
    url = request.getfixturevalue("postgres_url").replace(f"/{DATABASE}?", "/no_such_database?")
    with pytest.raises(wq.QueueError, match="no_such_database.*does not exist.*that the database exists"):
        wq.open_storage(url)


def test_unknown_database_kind_is_a_queue_error():
    with pytest.raises(wq.QueueError, match="unknown kind of database.*postgresql"):
        wq.open_storage("nosuchdb://host/grid")


# --- journal repair, refused paths ---------------------------------------------------------------

_WORKER = dict(heartbeat_interval=0.1, grace_period=0.5)  # a dead worker's cell is retried within a second


def _execute(cell: dict) -> dict:
    return {"key": _key(cell)}


def _assert_every_line_is_a_record(path: Path) -> None:
    data = path.read_bytes()
    assert data.endswith(b"\n")
    assert all(isinstance(json.loads(line), dict) for line in data.splitlines())


def _assert_each_cell_complete_once(url: str, name: str, cells: list[dict]) -> None:
    trials = optuna.load_study(study_name=name, storage=wq.open_storage(url)).trials
    complete = [t.user_attrs["cell_key"] for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(complete) == sorted(map(_key, cells))
    assert sorted(r["key"] for r in wq.reports_from_storage(url, name)) == sorted(map(_key, cells))


TEARS = {  # the last record as a dying writer left it
    "first byte only": lambda record: record[:1],
    "half": lambda record: record[: len(record) // 2],
    "all but its newline": lambda record: record[:-1],
    "half, then a newline": lambda record: record[: len(record) // 2] + b"\n",
}


@pytest.mark.parametrize("tear", TEARS)
def test_torn_last_record_is_cut_off_and_its_cell_retried(tmp_path, caplog, tear):
    path, name, cells = tmp_path / "q.journal", "grid", _cells()[:3]
    wq.enqueue_cells(str(path), name, cells, _key)
    study = optuna.load_study(study_name=name, storage=wq.open_storage(path))
    study.tell(study.ask(), 1.0)  # a worker finishes a cell and dies while writing that record
    data = path.read_bytes()
    start = data[:-1].rfind(b"\n") + 1
    torn = TEARS[tear](data[start:])
    path.write_bytes(data[:start] + torn)

    with caplog.at_level(logging.WARNING, logger="work_queue"):
        ran = wq.run_worker(str(path), name, _execute, **_WORKER)
    sides = list(tmp_path.glob("q.journal.torn-*"))
    assert [side.read_bytes() for side in sides] == [torn]
    assert any(str(path) in r.getMessage() and str(sides[0]) in r.getMessage() for r in caplog.records)
    _assert_every_line_is_a_record(path)
    status = wq.queue_status(str(path), name)
    assert ran == 3 and status["counts"] == {"COMPLETE": 3, "FAIL": 1}  # the torn cell failed as dead, retried
    _assert_each_cell_complete_once(str(path), name, cells)


def test_journal_whose_first_record_is_torn_opens_empty(tmp_path):
    path = tmp_path / "q.journal"
    path.write_bytes(b'{"op_co')
    wq.enqueue_cells(str(path), "grid", _cells()[:2], _key)
    _assert_every_line_is_a_record(path)
    assert [side.read_bytes() for side in tmp_path.glob("q.journal.torn-*")] == [b'{"op_co']
    assert wq.repair_journal(path) is None  # whole now


def test_open_journal_never_appends_onto_a_line_torn_meanwhile(tmp_path):
    path = tmp_path / "q.journal"
    storage = wq.open_storage(path)  # this worker keeps the journal open...
    wq.enqueue_cells(storage, "grid", _cells()[:1], _key)
    torn = b'{"op_code":8,"worker_id":"dead","trial_id":0,"user_attr":{"heartb'
    with open(path, "ab") as journal:  # ...while another one dies in the middle of a write
        journal.write(torn)
    assert wq.enqueue_cells(storage, "grid", _cells()[:2], _key) == 1
    _assert_every_line_is_a_record(path)
    assert [side.read_bytes() for side in tmp_path.glob("q.journal.torn-*")] == [torn]
    trials = optuna.load_study(study_name="grid", storage=wq.open_storage(path)).trials
    assert [t.user_attrs["cell_key"] for t in trials] == [_key(c) for c in _cells()[:2]]


# The n-th append of the worker (1: its claim of a cell, 2: its name, 3: first heartbeat, 4: the report,
# 5: COMPLETE; 7 and 10 the same steps of later cells), or the first heartbeat of its background thread.
@pytest.mark.parametrize("failing_write", [1, 2, 3, 4, 5, 7, 10, "background heartbeat"])
def test_disk_full_in_the_middle_of_a_write(tmp_path, monkeypatch, failing_write):
    path, name, cells = tmp_path / "q.journal", "grid", _cells()[:3]
    wq.enqueue_cells(str(path), name, cells, _key)
    real_append, writes, failed = wq._JournalFile._append, [], []

    def fails_now() -> bool:
        if failing_write == "background heartbeat":
            return threading.current_thread().name == "work-queue-monitor"
        return len(writes) == failing_write

    def append_until_the_disk_fills(self, data: bytes) -> None:
        writes.append(data)
        if not failed and fails_now():  # half the record reaches the disk, then ENOSPC
            failed.append(data[: len(data) // 2])
            real_append(self, failed[0])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_append(self, data)

    def slow_execute(cell: dict) -> dict:
        time.sleep(0.25)  # a few background heartbeats per cell
        return _execute(cell)

    monkeypatch.setattr(wq._JournalFile, "_append", append_until_the_disk_fills)
    for attempt in range(2):  # the worker that met the full disk stops; a second one finishes the grid
        try:
            wq.run_worker(str(path), name, slow_execute if failing_write == "background heartbeat" else _execute,
                          **_WORKER)
            break
        except wq.QueueError as err:
            assert attempt == 0 and "No space left on device" in str(err)
    assert len(failed) == 1 and [side.read_bytes() for side in tmp_path.glob("q.journal.torn-*")] == failed
    _assert_every_line_is_a_record(path)
    _assert_each_cell_complete_once(str(path), name, cells)


def test_a_file_that_is_not_a_journal_is_refused_untouched(tmp_path):
    path = tmp_path / "notes.journal"
    path.write_text("my notes\nsecond line")
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    calls = [lambda: wq.open_storage(path), lambda: wq.enqueue_cells(str(path), "grid", _cells(), _key),
             lambda: wq.run_worker(f"journal://{path}", "grid", _execute), lambda: wq.repair_journal(path)]
    for call in calls:
        with pytest.raises(wq.QueueError, match="is not an Optuna journal file"):
            call()
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
    assert list(tmp_path.iterdir()) == [path]  # no lock file, no side file


@pytest.mark.parametrize("where, message", [
    ("folder", "is a folder, not a journal file"),
    ("missing/q.journal", "does not exist: create it"),
    ("file.txt/q.journal", "is a file"),
])
def test_bad_journal_paths_are_queue_errors(tmp_path, where, message):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(wq.QueueError, match=message):
        wq.open_storage(tmp_path / where)
    assert not (tmp_path / "missing").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_read_only_folder_is_a_queue_error(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(wq.QueueError, match="is not writable"):
            wq.open_storage(folder / "q.journal")
    finally:
        folder.chmod(0o755)


# --- storage names, tuning studies, Optuna's log -------------------------------------------------


def test_default_storage_follows_the_reports_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "REPORTS_DIR", tmp_path / "elsewhere")
    assert wq.default_storage() == str(tmp_path / "elsewhere" / "optuna.journal")
    assert wq.is_storage(wq.default_storage())


@pytest.mark.parametrize("source, expected", [
    ("reports/optuna.journal", True), ("sqlite:///reports/optuna.db", True), ("grid.db", True),
    ("postgresql+psycopg2://u@h/db", True), ("reports/runs", False), (Path("reports"), False),
])
def test_is_storage(source, expected):
    assert wq.is_storage(source) is expected


def test_tuning_study_fails_trials_a_killed_process_left_running(tmp_path):
    url = str(tmp_path / "tune.journal")
    study = wq.create_tuning_study("tune", url, seed=0)
    study.tell(study.ask({"lr": optuna.distributions.FloatDistribution(0, 1)}), 0.5)
    study.ask()  # the tuning process is killed during this trial
    resumed = wq.create_tuning_study("tune", url, seed=0)
    done, killed = resumed.trials
    assert (done.state, done.value, killed.state) == (TrialState.COMPLETE, 0.5, TrialState.FAIL)
    assert killed.user_attrs == {"failure_reason": "interrupted"}
    assert wq.fail_interrupted_trials(resumed) == 0
    resumed.optimize(lambda trial: trial.suggest_float("lr", 0, 1), n_trials=1)
    assert [t.state for t in resumed.trials][-1] == TrialState.COMPLETE


@pytest.fixture
def optuna_logging_restored():
    optuna_logger = logging.getLogger("optuna")
    handlers, propagate = list(optuna_logger.handlers), optuna_logger.propagate
    yield
    optuna_logger.handlers[:] = handlers
    optuna_logger.propagate = propagate


def test_optuna_log_goes_through_the_library_logger_without_colours(tmp_path, capsys, optuna_logging_restored):
    target, stream = logging.getLogger("library-under-test"), io.StringIO()
    handler = logging.StreamHandler(stream)
    target.addHandler(handler)
    try:
        wq.configure_optuna_logging(target)
        wq.configure_optuna_logging(target)  # twice: still one copy of each record
        optuna.create_study(study_name="s", storage=wq.open_storage(tmp_path / "q.journal"))
    finally:
        target.removeHandler(handler)
    assert stream.getvalue() == "A new study created in Journal with name: s\n"  # no colour codes
    assert "A new study created" not in capsys.readouterr().err  # Optuna's coloured handler is gone


def test_experimental_warnings_of_the_optuna_calls_used_are_silenced(optuna_logging_restored):
    import warnings

    from optuna.visualization import matplotlib as optuna_plots

    study = optuna.create_study()
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    with warnings.catch_warnings(record=True) as caught:  # the filters set inside are dropped on exit
        warnings.simplefilter("always")
        wq.configure_optuna_logging()
        optuna_plots.plot_optimization_history(study)
        optuna_plots.plot_param_importances(study)
    assert not [w for w in caught if issubclass(w.category, optuna.exceptions.ExperimentalWarning)]


def test_journal_damaged_before_its_last_line_is_a_queue_error(tmp_path):
    path = tmp_path / "q.journal"
    wq.enqueue_cells(str(path), "grid", _cells()[:2], _key)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join([*lines[:1], lines[1][:10], *lines[1:]]))  # an old torn line, glued onto
    before = path.read_bytes()
    with pytest.raises(wq.QueueError, match="is damaged before its last line.*move it aside"):
        wq.open_storage(path)
    assert path.read_bytes() == before
