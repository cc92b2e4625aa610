"""The queue's files, and what makes an opening of them safe: ``queue.stamp`` (a
database that went missing is refused, never silently replaced by an empty
queue) and the WAL with its index that a running serve has open
(``pid/queue.index``: no other opening while ``queue.db-wal`` or ``queue.db-shm``
is not the file serve has).  ``database.Database.open`` runs both checks."""

from __future__ import annotations

import os
import time

from trimail.errors import TrimailError
from trimail.queue.lock import running_index
from trimail.queue.reads import rfc3339

DATABASE_NAME = "queue.db"
STAMP_NAME = "queue.stamp"


class QueueError(TrimailError):
    """A queue problem an operator must see (bad directory, newer schema, ...)."""


Identity = tuple[int, ...]


def index_identity(directory: str | os.PathLike[str]) -> Identity | None:
    """Device and inode of the queue's WAL (``queue.db-wal``) and of its index
    (``queue.db-shm``), None when either is missing.  Neither is removed while a
    connection is open (SQLite removes them at the last close), so while serve runs
    both stay the files its processes have open."""
    try:
        wal = os.stat(os.path.join(directory, DATABASE_NAME + "-wal"))
        shm = os.stat(os.path.join(directory, DATABASE_NAME + "-shm"))
    except FileNotFoundError:
        return None
    return wal.st_dev, wal.st_ino, shm.st_dev, shm.st_ino


def refuse_other_index(directory: str, expected: Identity | None = None) -> None:
    """QueueError when the ``queue.db-wal`` or ``queue.db-shm`` a running serve has
    open is no longer the file at that path (removed or replaced under it: SQLite
    cannot tell).  A connection opened now would make or use a WAL or an index of
    its own, the two sides would disagree, and mail could be lost (red team 29: 2 of
    63 messages, through a worker started after ``-shm`` was removed; ``sendmail``
    and the queue commands write too).  *expected*: what serve has open, when the
    caller knows (the master); else what the running serve recorded."""
    expected = expected or running_index(directory)
    if expected is not None and index_identity(directory) != expected:
        raise QueueError(f"{os.path.join(directory, DATABASE_NAME)}-wal or -shm was removed or replaced while "
                         "serve runs: opening the queue now would split it from serve's and could lose mail; "
                         "stop serve and start it again")


def check_not_lost(path: str) -> bool:
    """Whether the database must be created; refuse when it should exist and does not.

    ``queue.stamp`` is written once the database exists.  A missing or zero-length
    ``queue.db`` beside a stamp means the queue was deleted or truncated: SQLite
    would silently start an empty queue, and every queued message would be gone
    without a word, so we refuse instead."""
    stamp = os.path.join(os.path.dirname(path), STAMP_NAME)
    try:
        size: int | None = os.stat(path).st_size
    except FileNotFoundError:
        size = None
    except OSError as exc:
        raise QueueError(f"{path}: {exc.strerror}") from None
    if size:
        return False
    if os.path.exists(stamp):
        what = "missing" if size is None else "empty (zero length)"
        raise QueueError(f"{path}: {what}, but this queue directory held a queue ({stamp} exists): restore "
                         f"{DATABASE_NAME} from a backup (trimail queue backup), or remove {stamp} to start "
                         "with an empty queue")
    return True


def write_stamp(path: str) -> None:
    stamp = os.path.join(os.path.dirname(path), STAMP_NAME)
    if not os.path.exists(stamp):
        try:
            fd = os.open(stamp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with open(fd, "w") as out:  # O_EXCL: never through a planted (dangling) link
                out.write(f"queue database created {rfc3339(time.time())}\n")
        except OSError as exc:
            raise QueueError(f"{stamp}: {exc.strerror}") from None
