"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Each write goes to a temporary file in the same directory, is flushed to disk, then
renamed over the target (``os.replace`` is atomic on POSIX and Windows). Ctrl-C and SIGTERM
are held back for the few moments of a write (delivered right after it), so an interrupted
program leaves no temporary file behind; a full disk or a file-size limit removes the temporary
file and raises DiskFullError, a one-line message naming the file and the free space.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Errors that mean "no room for this file", not "this path is wrong".
_NO_ROOM = {errno.ENOSPC: "no space is left on the device", errno.EFBIG: "the file exceeds the file-size limit "
            "(ulimit -f)", errno.EDQUOT: "the disk quota is exceeded"}
_HELD_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class DiskFullError(OSError):
    """A write that found no room (ENOSPC, EFBIG, EDQUOT); the target file is unchanged."""


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically, creating parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _signals_held():
        tmp_name = None
        try:
            fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file a normal mode
            with os.fdopen(fd, "wb") as tmp:
                tmp.write(data)
                tmp.flush()
                os.fsync(tmp.fileno())
            os.replace(tmp_name, path)
        except BaseException as err:
            if tmp_name is not None:
                Path(tmp_name).unlink(missing_ok=True)
            if isinstance(err, OSError) and err.errno in _NO_ROOM:
                raise disk_full_error(path, err) from None
            raise
    return path


def disk_full_error(path: Path, err: OSError) -> DiskFullError:
    """The one-line DiskFullError for ``path``: the cause, the free space, and that nothing was replaced."""
    try:
        free = f"{shutil.disk_usage(path.parent).free / 1e6:,.1f} MB free there"
    except OSError:
        free = "free space unknown"
    full = DiskFullError(f"cannot write {path}: {_NO_ROOM[err.errno]}; {free}; the previous file, if any, is "
                         "unchanged: make room, then run the same command again")
    full.errno = err.errno
    return full


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM back until the block ends, then deliver them. Python runs signal handlers in
    the main thread whichever thread the signal reached, so the handlers themselves are swapped for ones
    that only note the signal (blocking it in the main thread alone would let one that reached another
    thread, such as a data-loading or heartbeat thread, through in the middle of the write). Outside the
    main thread handlers cannot be changed, and the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: arrived.append(signum)) for sig in _HELD_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(arrived):
            signal.raise_signal(sig)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through a buffer, then an atomic write."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())
