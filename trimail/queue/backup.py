"""An online backup of the queue: ``trimail queue backup FILE``.

SQLite's backup API (through apsw) copies the database page by page inside one
read transaction of our own connection, WAL content included, while serve goes on
accepting and delivering: the copy is the queue as it was at one instant.  It
never opens or closes ``queue.db`` outside SQLite (closing any descriptor of the
file would drop serve's POSIX locks: SQLite's "How To Corrupt", 2.2), which is why
operators should use this and not copy the file or run the system ``sqlite3``
tool against a live queue.

The copy is written to a temporary file beside *destination*, checked with
``PRAGMA quick_check``, fsynced and renamed into place (0600), so a failed or
interrupted backup never leaves a half-written file under the final name.

Restore: stop serve, copy the backup over ``queue_directory/queue.db``, remove
``queue.db-wal`` and ``queue.db-shm``, start serve (docs/operations.md).
"""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path

import apsw

from trimail.maps.source import private_directory, replaceable_by_others
from trimail.queue.database import QueueError
from trimail.queue.store import Store


@dataclasses.dataclass(frozen=True, slots=True)
class BackupResult:
    path: Path
    pages: int
    messages: int


def _check_destination(queue_directory: Path, target: Path) -> None:
    """The copy is renamed over *target*: never over the queue itself, anything in
    the queue directory, a device or a directory."""
    try:
        inside = target.resolve().parent == queue_directory.resolve()
    except OSError as exc:
        raise QueueError(f"{target}: {exc.strerror}") from None
    if inside:
        raise QueueError(f"{target}: is in the queue directory {queue_directory}; put the backup elsewhere")
    try:
        mode = target.lstat().st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise QueueError(f"{target}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise QueueError(f"{target}: exists and is not a regular file; refusing to replace it")
    live = queue_directory / "queue.db"
    if live.exists() and os.path.samefile(target, live):
        raise QueueError(f"{target}: is the live queue database; put the backup elsewhere")


def backup(queue_directory: str | os.PathLike[str], destination: str | os.PathLike[str]) -> BackupResult:
    """Copy the live queue database to *destination* (see the module docstring)."""
    target = Path(destination)
    _check_destination(Path(queue_directory), target)
    try:
        if replaceable_by_others(target.parent):
            raise QueueError(f"{target}: another user may replace files in {target.parent}; "
                             "put the backup where only root (or the user who runs the backup) may write")
    except OSError as exc:
        raise QueueError(f"backup to {target}: {exc.strerror or exc}") from None
    source = Store.open(queue_directory, readonly=True)
    try:
        # written in a 0700 directory of its own, then renamed: nobody else can open it
        # during the copy (red team 33b) or plant SQLite's -wal beside it (red team 33d)
        with private_directory(target.parent) as private:
            temporary = private / target.name
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
            pages, messages = _copy(source, temporary, target)
            os.replace(temporary, target)
        directory = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except apsw.Error as exc:
        raise QueueError(f"backup to {target}: {exc}") from None
    except OSError as exc:
        raise QueueError(f"backup to {target}: {exc.strerror or exc}") from None
    finally:
        source.close()
    return BackupResult(target, pages, messages)


def _copy(source: Store, temporary: Path, target: Path) -> tuple[int, int]:
    """The live queue copied into *temporary* (pages, messages), checked and fsynced."""
    copy = apsw.Connection(str(temporary), flags=apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_NOFOLLOW)
    try:
        with copy.backup("main", source.db, "main") as step:
            step.step(-1)  # all pages in one read transaction: one consistent instant
            pages = step.pagecount
        copy.execute("PRAGMA journal_mode = DELETE")  # a self-contained file, no -wal beside it
        check = copy.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise QueueError(f"{target}: the copy fails quick_check: {check}")
        messages = copy.execute("SELECT count(*) FROM message").fetchone()[0]
    finally:
        copy.close()
    copied = os.open(temporary, os.O_RDONLY | os.O_NOFOLLOW)  # our own copy, never the live queue.db
    try:
        os.fsync(copied)
    finally:
        os.close(copied)
    return pages, messages
