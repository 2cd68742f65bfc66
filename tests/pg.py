"""A throw-away PostgreSQL server for tests: `postgres_server()` and the `postgres_url` fixture.

The server runs from a temporary directory, listens only on a Unix socket there (no TCP port,
so parallel runs can not collide) and is stopped and removed afterwards. As root, PostgreSQL
refuses to run, so the cluster belongs to the ``postgres`` system user (created by Debian's
``postgresql`` package). Without PostgreSQL the tests that need it are skipped, except under
CI (``CI`` set), where they fail: CI must install ``postgresql``.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

DATABASE = "work_queue_test"
PORT = 5432  # only names the socket file: the server listens on no TCP port


def find_postgres_bin() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl``: PATH first, then Debian's versioned dirs."""
    initdb = shutil.which("initdb")
    if initdb:
        bin_dir = Path(initdb).resolve().parent
        if (bin_dir / "pg_ctl").exists():
            return bin_dir
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(Path(d).parent.name))
    for bin_dir in reversed(candidates):  # newest version first
        if (Path(bin_dir) / "initdb").exists() and (Path(bin_dir) / "pg_ctl").exists():
            return Path(bin_dir)
    return None


def _server_user() -> str | None:
    """The system user to run the server as: None for the current user, "postgres" for root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise RuntimeError("running as root and no 'postgres' system user to run PostgreSQL as") from None
    return "postgres"


def _run(args: list[str], user: str | None) -> None:
    command = ["runuser", "-u", user, "--", *args] if user else args
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")


@contextmanager
def postgres_server() -> Iterator[str]:
    """Start a fresh PostgreSQL cluster and yield an SQLAlchemy URL to an empty database in it."""
    bin_dir = find_postgres_bin()
    if bin_dir is None:
        raise RuntimeError("no PostgreSQL binaries (initdb, pg_ctl) on PATH or in /usr/lib/postgresql/*/bin")
    user = _server_user()
    root = Path(tempfile.mkdtemp(prefix="pg-"))  # short path: a socket path has at most 107 bytes
    data, log = root / "data", root / "server.log"
    if user:
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    try:
        _run([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync",
              "-E", "UTF8"], user)
        options = f"-k {root} -p {PORT} -c listen_addresses='' -c fsync=off"
        _run([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "30",
              "start"], user)
        try:
            _run([str(bin_dir / "createdb"), "-h", str(root), "-p", str(PORT), "-U", "postgres", DATABASE],
                 user)
            yield f"postgresql+psycopg2://postgres@/{DATABASE}?host={root}&port={PORT}"
        finally:
            _run([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"], user)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _unavailable_reason() -> str | None:
    if find_postgres_bin() is None:
        return "PostgreSQL is not installed (Debian: apt-get install postgresql)"
    try:
        _server_user()
    except RuntimeError as err:
        return str(err)
    return None


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """SQLAlchemy URL of a database on a throw-away PostgreSQL server (skipped without one, not in CI)."""
    reason = _unavailable_reason()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI needs PostgreSQL for these tests: {reason}")
        pytest.skip(reason)
    with postgres_server() as url:
        yield url
