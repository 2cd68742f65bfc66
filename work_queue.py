"""A work queue of experiment cells on an Optuna storage, shared by any number of workers.

A *cell* is a dict of JSON-able parameters (one training run) with a unique string key. The
process that builds the grid enqueues every cell once (`enqueue_cells`); workers, one per GPU or
machine, each call `run_worker`, which takes the next waiting cell, runs it and stores its report
in the storage, until no cell is left. Workers never enqueue new cells: concurrent
``enqueue_trial(skip_if_exists=True)`` calls can add the same trial twice (Optuna issue #2925).

Storage (`open_storage`): the journal file (default ``reports/optuna.journal``, `default_storage`)
is safe for several processes on one machine; a PostgreSQL (or MySQL) URL serves workers on many
machines. SQLite is for one worker only: it lacks ``SELECT ... FOR UPDATE``, and several workers on
it ran more trials than were queued and crashed (see the Optuna FAQ). A path that exists but is not
a journal is refused untouched. A worker killed, or a disk that fills, in the middle of a write
leaves the journal's last line torn; Optuna's readers skip it, but its next write would be glued
onto it and break every later read. So the journal is repaired when opened, and before each write,
under the lock Optuna's writers take: the torn tail is cut off and kept in a side file
(``<journal>.torn-<UTC time>``, `repair_journal`). The lost record never reached any reader, and a
cell it left RUNNING is retried by the watch for dead workers below.

This module is also the library's one contact with Optuna's storages for tuning studies
(`create_tuning_study`, `fail_interrupted_trials`) and with Optuna's log (`configure_optuna_logging`);
the only private Optuna name it reads is a trial's storage id (`_trial_id`).

Each cell is one Optuna trial. It is enqueued WAITING with ``params={}`` and the cell kept in
its user attributes (``cell``, ``cell_key``, ``retries``). A worker claims it by moving it from
WAITING to RUNNING, the same step ``Study.ask`` takes, which only one worker can win (the first
log line on the journal, a row lock on a database). `Study.ask` itself would create a new empty
trial when the queue is empty; claiming through the storage instead never makes spurious trials.
The report returned by the cell's function is stored as user attribute ``report`` of the
COMPLETE trial, so a summary can be built from the storage alone (`reports_from_storage`).

Recovering the cell of a dead worker (killed, preempted, lost machine), on every storage alike:

1. While a worker runs a cell, a background thread rewrites the trial's user attribute
   ``heartbeat`` every ``heartbeat_interval`` seconds (Optuna's own heartbeats exist only for
   RDB storages and ``Study.optimize``; a journal file has none).
2. The same thread in every worker watches the other RUNNING trials. A trial whose heartbeat
   has not changed for ``grace_period`` seconds of the watcher's own monotonic clock is stale.
   Only changes are compared, never time stamps, so machines need no synchronised clocks.
3. A watcher that finds a stale trial writes ``fail_reason`` on it and sets it FAIL. Only one
   watcher can win that change (a finished trial can not be updated: the storage raises
   ``UpdateFinishedTrialError`` for the others), and the winner enqueues the same cell again
   with ``retries`` + 1 and ``retry_of`` = the failed trial's number.
4. A cell whose worker died ``max_retries`` times is not enqueued again; its reason says so.
   A cell whose function raised is FAIL with ``error`` and is not retried either (the error
   would repeat); ``enqueue_cells(..., retry_failed=True)`` queues such cells again.
5. An idle worker does not leave while other cells are RUNNING: it keeps watching them, so the
   last cell of a dead worker is retried even when every other worker has run out of work. The
   winner of step 3 does not leave between failing the trial and enqueueing its retry (a lock
   between the worker and its thread), so it always finds the retry and runs it if nobody else
   does. Only a winner killed inside that millisecond would leave the cell FAIL without a retry:
   `queue_status` lists it, and ``enqueue_cells(..., retry_failed=True)`` queues it again.

A worker that was only slow (its heartbeat stalled for longer than ``grace_period``) may find
its cell retried by another worker; its own result is then refused by the storage and the retry
stores the report. The cell function should therefore be idempotent (return the existing report
when the run is already done), so a rare double run costs time but never a second result.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import optuna
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock
from optuna.trial import FrozenTrial, TrialState

import config
from atomic_io import DiskFullError, atomic_write_bytes

logger = logging.getLogger(__name__)

JOURNAL_NAME = "optuna.journal"
# How every record of an Optuna journal starts (json.dumps of a dict whose first key is op_code).
JOURNAL_SIGNATURE = b'{"op_code"'
# User attributes of a cell's trial.
CELL_ATTR = "cell"
KEY_ATTR = "cell_key"
RETRIES_ATTR = "retries"
RETRY_OF_ATTR = "retry_of"
REPORT_ATTR = "report"
HEARTBEAT_ATTR = "heartbeat"
WORKER_ATTR = "worker"
ERROR_ATTR = "error"
FAIL_REASON_ATTR = "fail_reason"
# Study user attribute prefix of the plans declared on a queue ("plan:<id>" -> the plan's declaration).
PLAN_ATTR_PREFIX = "plan:"
# User attribute of a tuning trial failed by `fail_interrupted_trials` (or by the objective).
TUNING_FAILURE_ATTR = "failure_reason"
# Optuna functions the library calls that Optuna marks experimental (their warning is silenced).
EXPERIMENTAL_OPTUNA_CALLS = ("plot_optimization_history", "plot_param_importances")


class QueueError(RuntimeError):
    """The storage can not be opened, or the queue is used in a way it does not support."""


# ---------------------------------------------------------------------------------------------
# Storage


def default_storage() -> str:
    """The journal file used when no storage is named: ``<REPORTS_DIR>/optuna.journal`` (read at call time)."""
    return str(Path(config.REPORTS_DIR) / JOURNAL_NAME)


def is_storage(source: str | Path) -> bool:
    """Whether ``source`` names an Optuna storage (a URL, or a ``.journal`` / ``.db`` file) rather than a folder."""
    text = str(source)
    return "://" in text or text.endswith((".journal", ".db"))


def open_storage(url: str | Path | None = None, *, connect_timeout: int = 5) -> BaseStorage:
    """Open the queue's storage: a journal file, or a database given by an SQLAlchemy URL.

    ``None`` -> the default journal file (its folder is created); a path, or ``journal://<path>``
    -> that journal file, in a folder that must exist; ``sqlite:///<path>`` -> SQLite (one worker
    only); any other URL such as ``postgresql+psycopg2://user:password@host:5432/db`` -> that
    database, failing within about ``connect_timeout`` seconds with a `QueueError` when it can not
    be reached. A journal whose last record was torn (a worker killed or a disk full mid-write) is
    repaired on opening (`repair_journal`); a file that is not a journal is refused untouched.
    """
    text = default_storage() if url is None else str(url)
    if not isinstance(url, Path) and _ONE_SLASH_URL.match(text):
        raise QueueError(f"{mask_password(text)} looks like a storage URL with one slash after the scheme: write "
                         f"{_ONE_SLASH_URL.match(text).group(1)}://... (read as a path, it would name a new journal "
                         "file)")
    if isinstance(url, Path) or "://" not in text:
        if text.endswith((".db", ".sqlite", ".sqlite3")):
            raise QueueError(f"{text} looks like a SQLite file: open it as sqlite:///{text} (one worker)")
        return _open_journal(Path(text))
    if text.startswith("journal://"):
        return _open_journal(Path(text.removeprefix("journal://")))
    return _open_database(text, connect_timeout)


def open_existing_storage(url: str | Path | None = None) -> BaseStorage:
    """``open_storage`` for reading: a journal or SQLite file that does not exist yet is an error
    rather than a new empty storage (a database server answers for itself)."""
    text = default_storage() if url is None else str(url)
    mistyped_url = not isinstance(url, Path) and _ONE_SLASH_URL.match(text)  # open_storage names the typo
    if not mistyped_url and ("://" not in text or text.startswith(("journal://", "sqlite:///"))):
        path = Path(text.removeprefix("journal://").removeprefix("sqlite:///"))
        if not path.exists():
            raise QueueError(f"no queue storage at {mask_password(str(path))} (nothing was queued there yet): run "
                             "grid or study first, or name the storage with --storage")
    return open_storage(url)


def _open_journal(path: Path) -> JournalStorage:
    _check_journal_path(path)
    try:
        backend = _JournalFile(path)
        backend.repair()
        return JournalStorage(backend)
    except OSError as err:
        raise QueueError(f"cannot open the journal file {path}: {err.strerror or err}; check the path and "
                         "its permissions") from err
    except ValueError as err:  # a damaged record before the last line: Optuna can not replay the log
        raise QueueError(f"the journal file {path} is damaged before its last line ({err}): move it aside "
                         "and enqueue the cells again (finished runs keep their reports)") from err


def _check_journal_path(path: Path) -> None:
    """Refuse a journal path that can not work, before anything is created or written."""
    folder = path.parent
    if path.is_dir():
        raise QueueError(f"{path} is a folder, not a journal file: name a file in it, e.g. {path / JOURNAL_NAME}")
    if not folder.exists() and folder.resolve() == Path(config.REPORTS_DIR).resolve():
        folder.mkdir(parents=True, exist_ok=True)  # the library's own output folder
    if folder.exists() and not folder.is_dir():
        raise QueueError(f"{folder} is a file, so the journal file {path} can not be in it: fix the path")
    if not folder.is_dir():
        raise QueueError(f"the folder {folder} of the journal file {path} does not exist: create it, or fix "
                         "the path (a mistyped folder would start a second, empty queue)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise QueueError(f"the folder {folder} is not writable, and the journal {path.name} and its lock file "
                         "are written there: choose a writable folder or fix its permissions")
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise QueueError(f"the journal file {path} is not readable and writable: fix its permissions")
    if path.exists() and not _looks_like_journal(path):
        raise QueueError(f"{path} exists and is not an Optuna journal file (left untouched): name a new file "
                         "or an existing journal, e.g. reports/optuna.journal")


def _looks_like_journal(path: Path) -> bool:
    """Empty, or starting with Optuna's first record field (even when that first record is torn)."""
    with open(path, "rb") as file:
        head = file.read(len(JOURNAL_SIGNATURE) + 1)
    return head.startswith(JOURNAL_SIGNATURE) or JOURNAL_SIGNATURE.startswith(head)


def _open_database(url: str, connect_timeout: int) -> RDBStorage:
    import sqlalchemy  # an Optuna dependency; only database storages need it

    engine_kwargs: dict[str, Any] = {}
    if url.startswith(("postgresql", "mysql")):
        # Without a timeout an unreachable server keeps a worker waiting for minutes.
        engine_kwargs["connect_args"] = {"connect_timeout": connect_timeout}
    try:
        shown = sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except (sqlalchemy.exc.ArgumentError, ValueError) as err:
        raise QueueError(f"not a valid storage URL ({err}), e.g. postgresql+psycopg2://host/db") from err
    try:
        return RDBStorage(url, engine_kwargs=engine_kwargs)
    except ImportError as err:
        raise QueueError(f"no database driver for {shown}: {_driver_advice(url)}") from err
    except sqlalchemy.exc.NoSuchModuleError as err:
        raise QueueError(f"unknown kind of database in the storage URL {shown}: use a .journal file, "
                         "sqlite:///<file> or postgresql+psycopg2://user:password@host/db") from err
    except sqlalchemy.exc.SQLAlchemyError as err:
        first_line = str(err.orig if getattr(err, "orig", None) else err).strip().splitlines()[0]
        raise QueueError(
            f"cannot reach the storage database {shown} ({first_line}): check that the server is "
            "running, the host, port, user and password, that the database exists, and that a "
            "firewall lets this machine connect."
        ) from err


# "postgresql:/user:pw@host/db": a scheme of two or more letters followed by one slash, not a file path.
_ONE_SLASH_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):/(?!/)")


def mask_password(text: str) -> str:
    """``text`` with the password of anything shaped like ``user:password@host`` replaced by ``***``."""
    return re.sub(r"(:/{0,2}[^:/@\s]*:)[^@\s]*@", r"\1***@", text)


def _driver_advice(url: str) -> str:
    """What to write or install when SQLAlchemy finds no driver module for ``url``."""
    backend = url.split("://", 1)[0].split("+", 1)[0]
    if backend == "postgresql":  # SQLAlchemy 2.1's plain postgresql:// means psycopg 3, not psycopg2
        return ("write the URL as postgresql+psycopg2://user:password@host:5432/db (psycopg2-binary is among the "
                "requirements), or install psycopg for the psycopg 3 form postgresql+psycopg://")
    if backend in ("mysql", "mariadb"):
        return ("no MySQL driver is among the requirements: pip install pymysql and write the URL as "
                f"{backend}+pymysql://user:password@host:3306/db")
    return "install the database's SQLAlchemy driver, or use a .journal file"


def _is_sqlite(storage: BaseStorage) -> bool:
    return isinstance(storage, RDBStorage) and storage.url.startswith("sqlite")


def _as_storage(storage: BaseStorage | str | Path | None) -> BaseStorage:
    return storage if isinstance(storage, BaseStorage) else open_storage(storage)


def _load_study(storage: BaseStorage, study_name: str) -> optuna.Study:
    config.check_name("queue name", study_name)
    try:
        return optuna.load_study(study_name=study_name, storage=storage)
    except KeyError as err:
        names = optuna.get_all_study_names(storage)
        known = f" (it holds {', '.join(map(repr, names))})" if names else " (it holds no study yet)"
        raise QueueError(f"no study {study_name!r} in the storage{known}: enqueue the cells first, "
                         "or name an existing study") from err


# ---------------------------------------------------------------------------------------------
# The journal file: torn last records are cut off, never appended onto


class _JournalFile(JournalFileBackend):
    """Optuna's journal file whose writers first cut off a torn last record.

    A worker killed, or a disk that fills, in the middle of an append leaves a last line without
    its newline. Optuna's readers skip such a line, but its next append would be glued onto it and
    make every later read fail. Here each append, under the same lock Optuna's file backend takes
    for its writes, first checks the file's last byte and cuts a torn tail off (`_cut_torn_tail`).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = JournalFileSymlinkLock(str(path))  # the lock Optuna's JournalFileBackend uses by default
        super().__init__(str(path), lock_obj=self.lock)

    def repair(self) -> Path | None:
        """Cut off a torn or unparseable last line; return the side file that keeps it, or None."""
        with _locked(self.lock):
            return _cut_torn_tail(self.path, check_last_line=True)

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        data = "".join(json.dumps(log, separators=(",", ":")) + "\n" for log in logs).encode("utf-8")
        with _locked(self.lock):
            _cut_torn_tail(self.path, check_last_line=False)
            self._append(data)

    def _append(self, data: bytes) -> None:
        with open(self.path, "ab") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())


def repair_journal(path: str | Path) -> Path | None:
    """Cut a torn or unparseable last line off the journal file at ``path``, under its lock.

    The cut bytes are kept in ``<journal>.torn-<UTC time>`` and a warning names both files; the
    side file's path is returned (None when the journal was whole). The record lost was never
    applied by any reader, so the queue reads as before; a cell whose finishing record was torn
    is still RUNNING and is retried by the dead-worker watch like any other.
    """
    path = Path(path)
    _check_journal_path(path)
    return _JournalFile(path).repair()


@contextlib.contextmanager
def _locked(lock: JournalFileSymlinkLock) -> Iterator[None]:
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _cut_torn_tail(path: Path, *, check_last_line: bool) -> Path | None:
    """Truncate the journal before its torn tail, saved first to a side file (caller holds the lock).

    A tail is torn when the file does not end with a newline; with ``check_last_line`` a last
    line that is not a JSON record counts as torn too (reading it costs more than one byte).
    """
    with open(path, "r+b") as file:
        size = file.seek(0, os.SEEK_END)
        start = _torn_tail_start(file, size, check_last_line)
        if start is None:
            return None
        file.seek(start)
        torn = file.read()
        side = _save_torn_bytes(path, torn)
        file.truncate(start)
        file.flush()
        os.fsync(file.fileno())
    logger.warning("the journal %s ended in a torn record (%d bytes; a worker killed or a disk full while "
                   "writing): cut off and kept in %s; a cell it left running is retried", path, len(torn), side)
    return side


def _torn_tail_start(file: BinaryIO, size: int, check_last_line: bool) -> int | None:
    """Offset where the torn tail begins, or None when the file ends with a whole record."""
    if size == 0:
        return None
    file.seek(size - 1)
    if file.read(1) != b"\n":
        return _line_start(file, size)
    if not check_last_line:
        return None
    start = _line_start(file, size - 1)
    file.seek(start)
    return None if _is_record(file.read(size - start)) else start


def _line_start(file: BinaryIO, end: int, chunk: int = 1 << 16) -> int:
    """Offset just after the last newline before ``end`` (0 when there is none), read backwards."""
    position = end
    while position > 0:
        step = min(chunk, position)
        position -= step
        file.seek(position)
        newline = file.read(step).rfind(b"\n")
        if newline >= 0:
            return position + newline + 1
    return 0


def _is_record(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return False


def _save_torn_bytes(path: Path, torn: bytes) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    side = path.with_name(f"{path.name}.torn-{stamp}")
    n = 1
    while side.exists():
        n += 1
        side = path.with_name(f"{path.name}.torn-{stamp}-{n}")
    try:
        atomic_write_bytes(side, torn)
    except OSError as err:
        raise QueueError(f"the journal {path} ends in a torn record that could not be saved to {side} "
                         f"({err.strerror or err}): free disk space and open the queue again; the journal "
                         "was not changed") from err
    return side


# ---------------------------------------------------------------------------------------------
# Enqueueing (one process only)


def enqueue_cells(
    storage: BaseStorage | str | Path | None,
    study_name: str,
    cells: Iterable[dict],
    key: str | Callable[[dict], str] = KEY_ATTR,
    *,
    retry_failed: bool = False,
) -> int:
    """Create the study if needed and enqueue every cell not already in it; return how many were added.

    ``key`` names the field holding each cell's unique string key (default ``"cell_key"``) or is
    a function of the cell. A cell is present when any trial of the study, in any state, has its
    key. With ``retry_failed`` a cell whose trials all FAILed is enqueued again. Call this from
    one process (the one that builds the grid), never from the workers.
    """
    config.check_name("queue name", study_name)
    storage = _as_storage(storage)
    study = optuna.create_study(storage=storage, study_name=study_name, load_if_exists=True,
                                direction="maximize")
    states_by_key: dict[str, set[TrialState]] = {}
    for trial in study.get_trials(deepcopy=False):
        if KEY_ATTR in trial.user_attrs:
            states_by_key.setdefault(trial.user_attrs[KEY_ATTR], set()).add(trial.state)
    added = 0
    key_fn = key if callable(key) else lambda cell: cell[key]
    for cell_key, cell in _unique_cells(cells, key_fn).items():
        states = states_by_key.get(cell_key)
        if states is None or (retry_failed and states == {TrialState.FAIL}):
            study.enqueue_trial({}, user_attrs={CELL_ATTR: cell, KEY_ATTR: cell_key, RETRIES_ATTR: 0})
            added += 1
    return added


def _unique_cells(cells: Iterable[dict], key_fn: Callable[[dict], str]) -> dict[str, dict]:
    """Cells by key; the same cell twice counts once, two different cells with one key is an error."""
    unique: dict[str, dict] = {}
    for cell in cells:
        try:
            key = key_fn(cell)
        except KeyError as err:
            raise QueueError(f"cell without its key field {err}: {cell}") from err
        if not isinstance(key, str):
            raise QueueError(f"a cell key must be a string, got {key!r}")
        try:
            cell = json.loads(json.dumps(cell))  # stored as JSON: tuples become lists, as on reload
        except TypeError as err:
            raise QueueError(f"cell {key!r} is not JSON-serialisable: {err}") from err
        if key in unique and unique[key] != cell:
            raise QueueError(f"two different cells share the key {key!r}")
        unique[key] = cell
    return unique


# ---------------------------------------------------------------------------------------------
# Claiming and finishing trials (storage API; safe with many workers)


def _trial_id(trial: FrozenTrial) -> int:
    # Storages address trials by their id, which FrozenTrial keeps private (Optuna itself reads
    # it the same way, e.g. in fail_stale_trials).
    return trial._trial_id


def _claim_next(storage: BaseStorage, study_id: int) -> FrozenTrial | None:
    """Move the oldest waiting cell to RUNNING for this worker, or return None when none waits.

    The step of ``Study._pop_waiting_trial_id``: ``set_trial_state_values(RUNNING)`` succeeds
    for exactly one worker; the others get False (already RUNNING) or UpdateFinishedTrialError.
    """
    for trial in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,)):
        if CELL_ATTR not in trial.user_attrs:
            continue  # not a cell of this queue
        try:
            if storage.set_trial_state_values(_trial_id(trial), state=TrialState.RUNNING):
                return storage.get_trial(_trial_id(trial))
        except UpdateFinishedTrialError:
            continue
    return None


def _running_cells(storage: BaseStorage, study_id: int) -> list[FrozenTrial]:
    trials = storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
    return [t for t in trials if KEY_ATTR in t.user_attrs]


def _finish(storage: BaseStorage, trial: FrozenTrial, state: TrialState, attrs: dict[str, Any],
            value: float | None = None) -> bool:
    """Write ``attrs`` and finish the trial; False when another worker already failed it as stale."""
    try:
        for name, attr in attrs.items():
            storage.set_trial_user_attr(_trial_id(trial), name, attr)
        storage.set_trial_state_values(_trial_id(trial), state, None if value is None else [value])
    except UpdateFinishedTrialError:
        logger.warning("trial %d (%s) was failed as stale by another worker, which retries it",
                       trial.number, trial.user_attrs[KEY_ATTR])
        return False
    return True


def _fail_and_requeue(storage: BaseStorage, study: optuna.Study, trial: FrozenTrial, reason: str,
                      max_retries: int) -> bool:
    """Fail a RUNNING trial whose worker is gone and enqueue its cell again (up to ``max_retries``).

    Several workers may call this for one trial at once; only the one whose FAIL reaches the
    storage first returns True and enqueues the retry.
    """
    retries = trial.user_attrs.get(RETRIES_ATTR, 0)
    give_up = retries >= max_retries
    if give_up:
        reason += f"; not retried: the cell was already retried {retries} times (max_retries)"
    try:
        storage.set_trial_user_attr(_trial_id(trial), FAIL_REASON_ATTR, reason)
        storage.set_trial_state_values(_trial_id(trial), TrialState.FAIL)
    except UpdateFinishedTrialError:
        return False  # another worker failed it first, or it has just finished after all
    logger.warning("trial %d (%s): %s", trial.number, trial.user_attrs[KEY_ATTR], reason)
    if not give_up:
        study.enqueue_trial({}, user_attrs={
            CELL_ATTR: trial.user_attrs[CELL_ATTR], KEY_ATTR: trial.user_attrs[KEY_ATTR],
            RETRIES_ATTR: retries + 1, RETRY_OF_ATTR: trial.number,
        })
    return True


# ---------------------------------------------------------------------------------------------
# Heartbeats and the watch for dead workers


class _Monitor:
    """Background thread of a worker: beats its running trial's heartbeat, fails others' stale ones."""

    def __init__(self, storage: BaseStorage, study: optuna.Study, study_id: int,
                 heartbeat_interval: float, grace_period: float, max_retries: int) -> None:
        self.storage, self.study, self.study_id = storage, study, study_id
        self.heartbeat_interval, self.grace_period = heartbeat_interval, grace_period
        self.max_retries = max_retries
        self._trial_id: int | None = None  # the trial this worker runs, set by the main thread
        self._seen: dict[int, tuple[Any, float]] = {}  # trial id -> (heartbeat, monotonic first seen)
        self.lock = threading.Lock()  # held while recovering a stale trial
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="work-queue-monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def watch(self, trial_id: int | None) -> None:
        """Beat for ``trial_id`` from now on (None: this worker runs nothing); beats once at once."""
        self._trial_id = trial_id
        if trial_id is not None:
            self._beat(trial_id)

    def _loop(self) -> None:
        while not self._stop.wait(self.heartbeat_interval):
            try:
                trial_id = self._trial_id
                if trial_id is not None:
                    self._beat(trial_id)
                self.recover_stale()
            except Exception:  # a storage hiccup must not end the watch; the next round retries
                logger.exception("work queue monitor round failed")

    def _beat(self, trial_id: int) -> None:
        try:
            self.storage.set_trial_user_attr(trial_id, HEARTBEAT_ATTR, time.time())
        except UpdateFinishedTrialError:
            pass  # finished meanwhile, or failed as stale by another worker (_finish reports it)

    def recover_stale(self) -> None:
        """Fail and re-enqueue the running cells of other workers whose heartbeat stopped."""
        for trial in self._stale(_running_cells(self.storage, self.study_id)):
            worker = trial.user_attrs.get(WORKER_ATTR, "?")
            reason = f"worker {worker} lost: no heartbeat for {self.grace_period:g} s"
            with self.lock:
                _fail_and_requeue(self.storage, self.study, trial, reason, self.max_retries)

    def _stale(self, running: list[FrozenTrial]) -> list[FrozenTrial]:
        """Trials whose heartbeat this monitor has seen unchanged for longer than the grace period."""
        now = time.monotonic()
        seen: dict[int, tuple[Any, float]] = {}
        stale = []
        for trial in running:
            trial_id = _trial_id(trial)
            if trial_id == self._trial_id:
                continue
            beat = trial.user_attrs.get(HEARTBEAT_ATTR)
            previous = self._seen.get(trial_id)
            seen[trial_id] = previous if previous is not None and previous[0] == beat else (beat, now)
            if now - seen[trial_id][1] > self.grace_period:
                stale.append(trial)
        self._seen = seen  # forget trials that are no longer running
        return stale


# ---------------------------------------------------------------------------------------------
# The worker


def run_worker(
    storage: BaseStorage | str | Path | None,
    study_name: str,
    execute: Callable[[dict], dict],
    *,
    value_key: str | None = None,
    heartbeat_interval: float = 30.0,
    grace_period: float = 120.0,
    max_retries: int = 3,
    worker_id: str | None = None,
    wait_for_running: bool = True,
) -> int:
    """Run waiting cells of the study until none is left; return how many cells this worker ran.

    ``execute(cell) -> report`` runs one cell; the JSON-able report is stored with the trial,
    whose value is ``report[value_key]`` (0.0 without ``value_key``). A cell whose ``execute``
    raises is recorded as FAIL with its error, and the worker goes on. With
    ``wait_for_running`` an idle worker stays while other cells are RUNNING, to retry them if
    their worker dies (see the module docstring); without it, it leaves when nothing waits.
    """
    if not 0 < heartbeat_interval < grace_period:
        raise ValueError("need 0 < heartbeat_interval < grace_period (a few heartbeats per grace period)")
    config.check_name("queue name", study_name)
    storage = _as_storage(storage)
    if _is_sqlite(storage):
        warnings.warn("SQLite storage is safe for one worker only; use the journal file or PostgreSQL "
                      "for several workers", stacklevel=2)
    study = _load_study(storage, study_name)
    study_id = storage.get_study_id_from_name(study_name)
    worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
    monitor = _Monitor(storage, study, study_id, heartbeat_interval, grace_period, max_retries)
    monitor.start()
    n_ran = 0
    try:
        while True:
            # Under the monitor's lock: a cell it is failing and enqueueing again at this moment
            # is seen before this worker decides to leave (it is FAIL before its retry exists).
            with monitor.lock:
                trial = _claim_next(storage, study_id)
                if trial is None and not (wait_for_running and _running_cells(storage, study_id)):
                    return n_ran
            if trial is None:
                time.sleep(heartbeat_interval)  # the monitor thread retries them if they go stale
                continue
            _run_cell(storage, study, trial, execute, monitor, worker_id, value_key, max_retries)
            n_ran += 1
    except DiskFullError:
        raise  # a cell's own write: its message names the file
    except OSError as err:  # the cell's own errors are caught in _run_cell: this is the storage's file
        raise QueueError(f"cannot write to the queue's storage ({err.strerror or err}): free disk space or "
                         "fix permissions, then start the worker again (its running cell is retried)") from err
    finally:
        monitor.stop()


def _run_cell(storage: BaseStorage, study: optuna.Study, trial: FrozenTrial,
              execute: Callable[[dict], dict], monitor: _Monitor, worker_id: str,
              value_key: str | None, max_retries: int) -> None:
    """Execute one claimed cell under heartbeats and record its report or its error."""
    key = trial.user_attrs[KEY_ATTR]
    storage.set_trial_user_attr(_trial_id(trial), WORKER_ATTR, worker_id)
    monitor.watch(_trial_id(trial))
    logger.info("worker %s runs cell %s (trial %d)", worker_id, key, trial.number)
    try:
        report = json.loads(json.dumps(execute(dict(trial.user_attrs[CELL_ATTR]))))
        value = float(report[value_key]) if value_key is not None else 0.0
    except DiskFullError:  # the disk, not the cell, failed: queue it again and stop this worker
        monitor.watch(None)
        _fail_and_requeue(storage, study, trial, f"worker {worker_id} found no room to write", max_retries)
        raise
    except Exception as err:
        monitor.watch(None)
        logger.exception("cell %s failed", key)
        _finish(storage, trial, TrialState.FAIL, {ERROR_ATTR: f"{type(err).__name__}: {err}"})
        return
    except BaseException:  # interrupted (Ctrl-C, SystemExit): the cell is not to blame, queue it again
        monitor.watch(None)
        _fail_and_requeue(storage, study, trial, f"worker {worker_id} interrupted", max_retries)
        raise
    monitor.watch(None)
    _finish(storage, trial, TrialState.COMPLETE, {REPORT_ATTR: report}, value)


# ---------------------------------------------------------------------------------------------
# Reading the queue


def reports_from_storage(storage: BaseStorage | str | Path | None, study_name: str) -> list[dict]:
    """The stored report of every completed cell: one per cell key, from its newest COMPLETE trial."""
    config.check_name("queue name", study_name)  # before the storage is opened (or created)
    storage = _as_storage(storage)
    trials = _load_study(storage, study_name).get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    newest: dict[str, FrozenTrial] = {}
    for trial in trials:  # trial numbers grow, so a later trial of a key replaces an earlier one
        if KEY_ATTR in trial.user_attrs and REPORT_ATTR in trial.user_attrs:
            newest[trial.user_attrs[KEY_ATTR]] = trial
    return [trial.user_attrs[REPORT_ATTR] for trial in newest.values()]


def declare_queue_plan(storage: BaseStorage | str | Path | None, study_name: str, plan: dict) -> None:
    """Record a plan (a JSON-able dict with an ``id``) on the queue, replacing an earlier record of it."""
    _load_study(_as_storage(storage), study_name).set_user_attr(PLAN_ATTR_PREFIX + plan["id"], plan)


def queue_plans(storage: BaseStorage | str | Path | None, study_name: str) -> list[dict]:
    """The plans recorded on the queue (`declare_queue_plan`)."""
    attrs = _load_study(_as_storage(storage), study_name).user_attrs
    return [plan for name, plan in sorted(attrs.items()) if name.startswith(PLAN_ATTR_PREFIX)]


def queue_status(storage: BaseStorage | str | Path | None, study_name: str) -> dict[str, Any]:
    """Counts of trials per state, cells done, cells given up (key -> reason) and the done reports."""
    config.check_name("queue name", study_name)  # before the storage is opened (or created)
    storage = _as_storage(storage)
    trials = _load_study(storage, study_name).get_trials(deepcopy=False)
    trials = [t for t in trials if KEY_ATTR in t.user_attrs]
    states_by_key: dict[str, set[TrialState]] = {}
    reasons: dict[str, str] = {}
    for trial in trials:
        key = trial.user_attrs[KEY_ATTR]
        states_by_key.setdefault(key, set()).add(trial.state)
        if trial.state == TrialState.FAIL:
            reasons[key] = trial.user_attrs.get(ERROR_ATTR) or trial.user_attrs.get(FAIL_REASON_ATTR, "?")
    reports = reports_from_storage(storage, study_name)
    return {
        "counts": dict(Counter(t.state.name for t in trials)),
        "n_cells": len(states_by_key),
        "n_done": len(reports),
        "failed": {k: reasons[k] for k, states in states_by_key.items() if states == {TrialState.FAIL}},
        "reports": reports,
    }


# A cell's state from its trials: done when one COMPLETE trial holds its report, else its newest trial's.
CELL_STATES = {TrialState.COMPLETE: "done", TrialState.RUNNING: "running", TrialState.WAITING: "waiting",
               TrialState.FAIL: "failed", TrialState.PRUNED: "done"}


def cell_states(storage: BaseStorage | str | Path | None, study_name: str) -> list[dict[str, Any]]:
    """One row per cell of a queue, in the order they were queued: its key, state (done, running,
    waiting, or failed: given up, with the reason), retries so far and the worker of its newest trial."""
    return _cell_rows(_load_study(_as_storage(storage), study_name).get_trials(deepcopy=False))


def _cell_rows(trials: list[FrozenTrial]) -> list[dict[str, Any]]:
    by_key: dict[str, list[FrozenTrial]] = {}
    for trial in sorted(trials, key=lambda t: t.number):
        if KEY_ATTR in trial.user_attrs:
            by_key.setdefault(trial.user_attrs[KEY_ATTR], []).append(trial)
    rows = []
    for key, cell_trials in by_key.items():
        newest = cell_trials[-1]
        done = any(t.state == TrialState.COMPLETE for t in cell_trials)
        state = "done" if done else CELL_STATES[newest.state]
        reason = newest.user_attrs.get(ERROR_ATTR) or newest.user_attrs.get(FAIL_REASON_ATTR, "?")
        rows.append({"cell": key, "state": state, "retries": newest.user_attrs.get(RETRIES_ATTR, 0),
                     "worker": newest.user_attrs.get(WORKER_ATTR, ""), "reason": reason if state == "failed" else ""})
    return rows


def storage_overview(storage: BaseStorage | str | Path | None) -> list[dict[str, Any]]:
    """One row per study in the storage, with its progress: a queue counts its cells per state
    (`cell_states`); a tuning study (trials without cells) counts its trials, finished ones (complete
    or pruned) as done."""
    storage = _as_storage(storage)
    rows = []
    for name in optuna.get_all_study_names(storage):
        trials = _load_study(storage, name).get_trials(deepcopy=False)
        cells = _cell_rows(trials)
        states = Counter(cell["state"] for cell in cells) if cells else Counter(CELL_STATES[t.state] for t in trials)
        rows.append({"study": name, "kind": "queue" if cells else "tuning", "total": sum(states.values()),
                     **{state: states.get(state, 0) for state in ("done", "running", "waiting", "failed")}})
    return rows


# ---------------------------------------------------------------------------------------------
# Tuning studies and Optuna's log


def create_tuning_study(study_name: str, storage: BaseStorage | str | Path | None, seed: int) -> optuna.Study:
    """Create or resume a maximising study (TPE seeded with ``seed``, median pruner after one step).

    Trials a killed tuning process left RUNNING are failed first (`fail_interrupted_trials`), so a
    resumed study counts its finished trials right.
    """
    config.check_name("study name", study_name)
    study = optuna.create_study(
        study_name=study_name, storage=_as_storage(storage), direction="maximize", load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=seed), pruner=optuna.pruners.MedianPruner(n_warmup_steps=1),
    )
    fail_interrupted_trials(study)
    return study


def fail_interrupted_trials(study: optuna.Study, reason: str = "interrupted") -> int:
    """Set FAIL, with user attribute ``failure_reason``, every trial left RUNNING; return how many.

    For a study run by one process at a time (tuning): its RUNNING trials belong to a process that
    is gone. The queue's cells have their own recovery (`run_worker`) and must not go through this.
    """
    failed = 0
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        trial = optuna.trial.Trial(study, _trial_id(frozen))
        try:
            trial.set_user_attr(TUNING_FAILURE_ATTR, reason)
        except UpdateFinishedTrialError:
            continue  # it finished meanwhile
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        failed += 1
    if failed:
        logger.warning("study %s: %d trial(s) left running by a stopped process set FAIL (%s)",
                       study.study_name, failed, reason)
    return failed


class _ForwardToLogger(logging.Handler):
    """Hands each Optuna log record to ``target``, whose handlers format it (no colour codes)."""

    def __init__(self, target: logging.Logger) -> None:
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        self.target.handle(record)


def configure_optuna_logging(target: logging.Logger | str | None = None) -> None:
    """Route Optuna's log records through ``target`` (default this module's logger), without colours.

    Optuna's own handler writes ANSI colour codes to stderr, which show as garbage in notebooks;
    it is removed and each record is handed to ``target`` instead, so Optuna's INFO lines (one per
    finished trial) show only where ``target`` has a handler at INFO level (e.g. after
    ``logging.basicConfig(level=logging.INFO)``). The `ExperimentalWarning` of the Optuna functions
    this library calls (their interface may change) is silenced. Safe to call more than once.
    """
    target = logging.getLogger(target) if isinstance(target, str) else target or logger
    optuna.logging.disable_default_handler()
    optuna.logging.disable_propagation()
    optuna_root = logging.getLogger("optuna")
    for handler in [h for h in optuna_root.handlers if isinstance(h, _ForwardToLogger)]:
        optuna_root.removeHandler(handler)
    optuna_root.addHandler(_ForwardToLogger(target))
    for name in EXPERIMENTAL_OPTUNA_CALLS:
        warnings.filterwarnings("ignore", message=rf".*\b{name} is experimental", category=ExperimentalWarning)
