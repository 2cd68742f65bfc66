"""The work queue on a journal file and on a real PostgreSQL server, with real worker processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
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
from tests.pg import postgres_url  # noqa: F401  (fixture, requested through the `storage_url` fixture)

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
