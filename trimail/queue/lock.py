"""One serve per queue: an exclusive lock and the pid file in ``queue_directory``.

The lock is ``flock(2)`` on ``master.lock``, held for the life of serve and
released by the kernel when the process dies (even on ``kill -9``), so a stale
pid file never blocks a restart.  The file holds the pid for ``trimail status``.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = "master.lock"


class AlreadyRunning(Exception):
    pass


class QueueLock:
    def __init__(self, queue_directory: Path) -> None:
        self.path = queue_directory / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlreadyRunning(f"{self.path}: another trimail serve (pid {read_pid(self.path)}) "
                                 "uses this queue_directory") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None


def read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isascii() and text.isdigit() else None


def running_pid(queue_directory: Path) -> int | None:
    """The pid of the serve holding the lock, or None when none runs."""
    path = queue_directory / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return read_pid(path)
    finally:
        os.close(fd)
    return None
