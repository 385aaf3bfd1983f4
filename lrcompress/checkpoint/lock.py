"""One writer per output directory: ``<out>.lock`` beside it, held for the whole run.

Why a lock at all: two runs into the same output share its staging directory ``<out>.partial``; without
one they overwrite each other's blocks and state, and one of them may finish over a checkpoint mixing
both recipes. The first run holds ``<out>.lock``; a second is refused before it does anything.

How: the lock file is opened with O_CREAT and locked with ``fcntl.flock(LOCK_EX | LOCK_NB)``, which is
atomic, and the kernel drops the lock when its holder dies, however it dies (kill -9 included). The
holder writes its pid, hostname and start time into the file, so that a refusal names who holds it.
A lock file that a dead run left behind (nobody holds its flock) is stale: the next run takes it over
and says whose it was. Releasing unlinks the file while still holding the lock; a run that opened the
old file in the meantime finds, after locking, that the path now names another file (or none) and
tries again, so two runs can never both believe they hold the lock.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from ..errors import CheckpointError
from .layout import check_output_dir, prepare_output_parent
from .staging import discard_if_unfinished, staging_path

ATTEMPTS = 5


def lock_path(final: Path) -> Path:
    return final.with_name(final.name + ".lock")


def _describe(holder: dict) -> str:
    if not holder:
        return "an unknown process"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on host {holder.get('hostname')} (since {started})"


def _read_holder(handle: int) -> dict:
    os.lseek(handle, 0, os.SEEK_SET)
    raw = os.read(handle, 4096)
    try:
        holder = json.loads(raw.decode()) if raw.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


class OutputLock:
    """``with OutputLock(out):`` holds ``<out>.lock`` or raises ``CheckpointError`` naming its holder."""

    def __init__(self, final: Path, announce: Callable[[str], None] | None = None) -> None:
        self.final = Path(final)
        self.path = lock_path(self.final)
        self.announce = announce or (lambda message: None)
        self._handle: int | None = None

    def acquire(self) -> None:
        for _ in range(ATTEMPTS):
            handle = self._open()
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(handle)
                os.close(handle)
                raise CheckpointError(
                    f"{self.final} is being written by another run: {_describe(holder)} holds {self.path}. "
                    "Wait for it to finish, or choose another output directory (output.dir / --output).") from None
            if self._same_file(handle):
                stale = _read_holder(handle)
                if stale:
                    self.announce(f"taking over the stale lock {self.path} of {_describe(stale)}, "
                                  "which is no longer running")
                self._record(handle)
                self._handle = handle
                return
            os.close(handle)             # released and removed while we waited: try the new file
        raise CheckpointError(f"could not take the lock {self.path}: it keeps being replaced by other runs")

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise CheckpointError(f"cannot write beside the output directory {self.final}: {self.path}: "
                                  f"{error.strerror or error}; choose a writable output.dir") from None

    def _same_file(self, handle: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(handle).st_ino
        except FileNotFoundError:
            return False

    @staticmethod
    def _record(handle: int) -> None:
        holder = {"pid": os.getpid(), "hostname": socket.gethostname(), "started": time.time()}
        os.ftruncate(handle, 0)
        os.lseek(handle, 0, os.SEEK_SET)
        os.write(handle, json.dumps(holder).encode())
        os.fsync(handle)

    def release(self) -> None:
        if self._handle is None:
            return
        try:
            self.path.unlink()
        except OSError as error:     # already gone or unremovable: the flock is what matters
            if error.errno != errno.ENOENT:
                self.announce(f"could not remove the lock file {self.path}: {error}")
        os.close(self._handle)       # closing drops the flock
        self._handle = None

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


@contextmanager
def claim_output_dir(final: Path, overwrite: bool, announce: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold ``final`` for the duration of a run: its parent created (or why not said), its lock taken,
    and, under the lock, an existing directory refused unless ``overwrite``. A run that fails before it
    finished a segment leaves no staging directory behind (``discard_if_unfinished``)."""
    prepare_output_parent(final)
    with OutputLock(final, announce):
        check_output_dir(final, overwrite)
        try:
            yield
        except BaseException:
            discard_if_unfinished(staging_path(final))
            raise
