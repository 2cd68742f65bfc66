"""Atomic writes: a failure mid-write leaves the previous file whole and no temp file behind."""

from __future__ import annotations

import errno
import json
import os
import signal
import threading
import time

import pytest
import torch

import atomic_io


def test_write_replaces_whole_file_with_normal_mode(tmp_path):
    path = atomic_io.atomic_write_json(tmp_path / "sub" / "report.json", {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()
    atomic_io.atomic_write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    path = atomic_io.atomic_write_text(tmp_path / "report.json", "old")

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_io.atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_torch_save_round_trip(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    path = atomic_io.atomic_torch_save(state, tmp_path / "m.pt")
    assert torch.equal(torch.load(path, weights_only=True)["w"], state["w"])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_file_size_limit_is_one_line_naming_the_file_and_keeps_the_old_one(tmp_path):
    """A real limit (RLIMIT_FSIZE; Python ignores SIGXFSZ, so the write fails with EFBIG)."""
    resource = pytest.importorskip("resource")
    path = atomic_io.atomic_write_bytes(tmp_path / "model.pt", b"old")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(atomic_io.DiskFullError) as caught:
            atomic_io.atomic_write_bytes(path, bytes(1 << 20))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    message = str(caught.value)
    assert str(path) in message and "file-size limit" in message and "MB free" in message
    assert "\n" not in message and caught.value.errno == errno.EFBIG
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_a_signal_during_a_write_arrives_after_it_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    class Stopped(BaseException):
        pass

    def stop(signum, frame):
        raise Stopped

    real_fsync = os.fsync

    def fsync_then_signal(fd):  # the signal arrives in the middle of the write
        real_fsync(fd)
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, stop)
    monkeypatch.setattr(os, "fsync", fsync_then_signal)
    try:
        with pytest.raises(Stopped):
            atomic_io.atomic_write_text(tmp_path / "run.metrics.csv", "epoch\n1\n")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert (tmp_path / "run.metrics.csv").read_text() == "epoch\n1\n"  # written whole, then interrupted
    assert [p.name for p in tmp_path.iterdir()] == ["run.metrics.csv"]


def test_a_signal_that_reaches_another_thread_still_waits_for_the_write(tmp_path, monkeypatch):
    """Python runs handlers in the main thread whichever thread the kernel chose, so a signal delivered to
    a waiting helper thread (a loader's, a heartbeat's) must be held back as well."""
    class Stopped(BaseException):
        pass

    def stop(signum, frame):
        raise Stopped

    helper_done = threading.Event()
    helper = threading.Thread(target=helper_done.wait, daemon=True)  # a thread the signal may reach
    real_fsync = os.fsync

    def fsync_then_signal(fd):
        real_fsync(fd)
        signal.pthread_kill(helper.ident, signal.SIGTERM)
        time.sleep(0.05)  # time enough for the main thread to run a handler it should not run yet

    helper.start()
    previous = signal.signal(signal.SIGTERM, stop)
    monkeypatch.setattr(os, "fsync", fsync_then_signal)
    try:
        with pytest.raises(Stopped):
            atomic_io.atomic_write_text(tmp_path / "run.metrics.csv", "epoch\n1\n")
    finally:
        signal.signal(signal.SIGTERM, previous)
        helper_done.set()
    assert (tmp_path / "run.metrics.csv").read_text() == "epoch\n1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["run.metrics.csv"]
