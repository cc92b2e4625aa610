"""Opening the queue database safely, and the transactions every queue module runs in.

Durability (RFC 5321 section 6.1: after ``250`` the message must survive a crash):
WAL journal with ``synchronous=FULL`` on every writing connection, so a COMMIT
returns only after the WAL is fsynced; serve's group-commit writers instead fsync
the WAL themselves after the COMMIT, outside the write lock (``sync_commits_itself``,
below), and answer only then.  Writers use ``BEGIN IMMEDIATE`` and wait
for the lock in short steps up to a busy timeout in seconds (``patient``), so
``trimail sendmail``, the smtpd workers and the qmgr worker share the file.  The
schema is brought to ``SCHEMA_VERSION`` (``schema.py``) when a writer opens it;
apsw's and the OS's failures become trimail's ``StorageError`` here
(``storage_error``), so nothing above the queue knows apsw's classes.

``Database`` is the connection half of ``store.Store``: open, migrate, transaction,
savepoint, read snapshot, checkpoint.

The fsync outside the lock (``sync_commits_itself``, ``sync_wal``; ``queue.writer``
uses it for every batch of accepted mail).  SQLite has one write lock, and with FULL
it fsyncs inside COMMIT while holding it, so the commits of several processes (two
smtpd workers, the qmgr) queued behind each other's fsyncs (0.6-0.8 ms here): with
two smtpd workers a commit took 1.45 ms, against 0.71 ms with one.  Such a
connection commits with ``synchronous = NORMAL`` and then ``fdatasync``s the WAL
through a descriptor of its own, so one process appends while another's fsync
runs.  The guarantee is FULL's: the WAL is only appended to until a checkpoint has
copied it, so the fsync after a commit makes its frames and all before them
durable; a checkpoint fsyncs the WAL before it copies and the database after (NORMAL
does both, in every process), so frames it took stay durable when the WAL is then
written from its start again; SQLite fsyncs a new WAL header before frames follow
it, at NORMAL too.  The descriptor stays valid: SQLite deletes the WAL only as the
last connection closes, and this one is open.  Two differences, towards a duplicate
and never a loss: another process may read the message between COMMIT and fsync
(the qmgr may deliver it; after a power loss in that window the client, which had
no ``250``, sends it again); and a failing fsync answers the batch with an error
although its rows are committed (they may be delivered; the client retries).

Security notes: the queue directory is created 0700 and the database 0600 (SQLite
gives its -wal and -shm files the same mode); the file is only ever opened by
SQLite and never through a planted link (root opens it before the privilege drop
in a directory mail_owner owns); a missing or truncated database beside
``queue.stamp`` is refused rather than silently replaced by an empty queue.
Nothing here takes a path from mail.

Test mode (trimail.testing only, never a parameter): ``unsafe_skip_fsync`` marks one
queue directory whose connections commit with ``synchronous = OFF``: atomic still
(WAL), but nothing is fsynced, so a power loss or kernel crash may lose mail already
acknowledged.  A test's throw-away queue needs no durability; no main.cf, ``-o`` or
environment variable can reach the switch.  Its connections also use SQLite's
``unix-excl`` VFS: the first to read the file locks it against every other process
(connections of the test's own process share it as usual), so the WAL index lives
in the heap, not in a ``-shm`` file made and mapped anew at each start.  The file
``queue.test`` beside it (``TEST_QUEUE_MARK``) makes any other process refuse it at
once, instead of waiting out the busy timeout for a lock it will never get.

Parameters: none (``queue_directory`` and the busy timeout come from the caller).
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, Self

import apsw

from trimail.errors import StorageError
from trimail.queue.guards import (
    DATABASE_NAME,
    QueueError,
    check_not_lost,
    refuse_other_index,
    write_stamp,
)
from trimail.queue.lock import open_regular_for_reading
from trimail.queue.schema import MIGRATIONS, SCHEMA_VERSION

BUSY_TIMEOUT_MS = 30_000
JOURNAL_SIZE_LIMIT = 64 << 20  # the WAL is truncated to this after a checkpoint
TEST_QUEUE_VFS = "unix-excl"  # a test queue's (see the module's docstring): every connection to it uses this
TEST_QUEUE_MARK = "queue.test"  # beside a test queue's database: another process refuses it at once


# test queue directories that skip fsync: their real paths, and the name each was marked by -> its real path
_UNSAFE_UNSYNCED: set[str] = set()
_UNSYNCED_NAMES: dict[str, str] = {}


def works_the_queue_itself(queue_directory: str | os.PathLike[str]) -> bool:
    """Whether this process reads and writes the queue itself: root and the queue's
    owner (mail_owner) do, whatever the modes say (red team 33b: a queue opened for
    mailq made every user's sendmail fail).  Every other user goes through serve's
    public socket (trimail.postqueue, trimail.public): sendmail, the listing and
    flush.  No queue yet: True (the opening says why)."""
    try:
        return os.geteuid() in (0, os.stat(queue_directory).st_uid)
    except OSError as exc:
        return isinstance(exc, FileNotFoundError)

def is_test_queue(queue_directory: str | os.PathLike[str]) -> bool:
    """Marked by ``unsafe_skip_fsync``: a throw-away queue of trimail.testing."""
    return bool(_UNSAFE_UNSYNCED) and _real_path(queue_directory) in _UNSAFE_UNSYNCED


def _real_path(queue_directory: str | os.PathLike[str]) -> str:
    """``os.path.realpath``, except for a test queue named as it was marked (its
    real path was found then: no lstat of every component at each open)."""
    named = os.fspath(queue_directory)
    return _UNSYNCED_NAMES.get(named) or os.path.realpath(named)


def unsafe_skip_fsync(queue_directory: str | os.PathLike[str], skip: bool = True) -> None:
    """UNSAFE, for trimail.testing's throw-away queues only: connections opened on
    *queue_directory* from now on never fsync (``PRAGMA synchronous = OFF``), so
    acknowledged mail may be lost on power loss.  ``skip=False`` forgets the mark."""
    named = os.fspath(queue_directory)
    real = _real_path(named)
    if skip:
        _UNSAFE_UNSYNCED.add(real)
        _UNSYNCED_NAMES[named] = real
    else:
        _UNSAFE_UNSYNCED.discard(real)
        for name in [name for name, its in list(_UNSYNCED_NAMES.items()) if its == real]:
            _UNSYNCED_NAMES.pop(name, None)


def prepare_directory(queue_directory: str | os.PathLike[str]) -> None:
    """Create the queue directory 0700 (or tighten it).

    The database file itself is never opened here: only SQLite opens it (see
    ``Database.open``), because closing any descriptor of the file would drop the
    POSIX locks that serve's connections hold on it."""
    try:
        try:
            status = os.stat(queue_directory)  # there already: the usual case, without mkdir's EEXIST
        except FileNotFoundError:
            Path(queue_directory).mkdir(mode=0o700, parents=True, exist_ok=True)
            status = os.stat(queue_directory)
        if not stat.S_ISDIR(status.st_mode):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST))
        if stat.S_IMODE(status.st_mode) & 0o077:
            os.chmod(queue_directory, 0o700)
    except OSError as exc:
        raise QueueError(f"queue_directory {queue_directory}: {exc.strerror}") from None


def storage_error(exc: BaseException) -> StorageError:
    """An apsw (or OS) failure of a queue operation as trimail's StorageError: the
    mapping at the SQLite edge, so nothing above it knows apsw's classes."""
    if isinstance(exc, StorageError):
        return exc
    error = _classify(exc)
    error.__cause__ = exc
    return error


def _classify(exc: BaseException) -> StorageError:
    if isinstance(exc, apsw.FullError) or (isinstance(exc, OSError) and exc.errno == errno.ENOSPC):
        return StorageError(f"queue file system full: {exc}", no_space=True)
    if isinstance(exc, (apsw.BusyError, apsw.LockedError)):
        return StorageError(f"queue database locked by another process past the busy timeout: {exc}")
    if isinstance(exc, (apsw.CorruptError, apsw.NotADBError)):
        return StorageError(f"queue database damaged: {exc}", temporary=False)
    return StorageError(f"queue database error: {type(exc).__name__}: {exc}")


def patient(timeout: float) -> Callable[[int], bool]:
    """SQLite's busy handler for one connection: wait for another process's
    transaction (an smtpd worker's commit, the qmgr's) in short steps, 0.1 ms
    doubling to 2 ms, for *timeout* seconds in all.  SQLite's own busy timeout
    sleeps 1, 2, 5, 10 ms ... and so leaves the lock idle long after a commit of a
    millisecond ended, which with several writing processes costs more than the
    commits themselves."""
    began = [0.0]

    def wait(tries: int) -> bool:
        now = time.monotonic()
        if tries == 0:
            began[0] = now
        elif now - began[0] >= timeout:
            return False
        time.sleep(min(0.0001 * (1 << min(tries, 5)), 0.002))
        return True

    return wait

class Database:
    """One connection to the queue database (not thread-safe: one thread each);
    ``store.Store`` adds the queue's writes and reads."""

    def __init__(self, connection: apsw.Connection, path: str) -> None:
        self.db = connection
        self.path = path
        self.durable = True  # PRAGMA synchronous = FULL (set in open)
        self.unsafe_unsynced = False  # PRAGMA synchronous = OFF for good: unsafe_skip_fsync
        self._wal: int | None = None  # a descriptor of the WAL file: sync_commits_itself
        self.wal_syncs = 0  # how many times sync_wal fsynced it
        self.busy_timeout = BUSY_TIMEOUT_MS / 1000

    @classmethod
    def open(cls, queue_directory: str | os.PathLike[str], *, readonly: bool = False,
                 busy_timeout: float = BUSY_TIMEOUT_MS / 1000) -> Self:
        """Connect to the queue database.

        A writing connection makes the directory and, when there is none yet (and
        ``queue.stamp`` does not say there was one), the database.  The file is only
        ever opened by SQLite: see ``prepare_directory``."""
        directory = os.fspath(queue_directory)
        # strings, not Path: its parsing was a sixth of the Python a test MTA's start + stop ran
        path = os.path.join(directory, DATABASE_NAME)
        if readonly:
            try:
                os.stat(path)
            except FileNotFoundError:
                raise QueueError(f"{path}: no queue database (has trimail serve run with this queue_directory?)") \
                    from None
            except PermissionError:  # (it said "no queue database" to a user who may not look: red team 33b)
                raise QueueError(f"{path}: permission denied: run as root or mail_owner") from None
            flags = apsw.SQLITE_OPEN_READWRITE  # a reader still writes the -shm index (WAL)
            new = False
        else:
            prepare_directory(directory)
            new = check_not_lost(path)
            flags = apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE
        # root opens this before the privilege drop in a directory mail_owner owns:
        # never through a planted link (the directory's own path is the operator's)
        real_directory = _real_path(directory)
        unsynced = real_directory in _UNSAFE_UNSYNCED
        if not unsynced and os.path.exists(os.path.join(real_directory, TEST_QUEUE_MARK)):
            raise QueueError(f"{path}: the queue of a trimail.testing test MTA, which only the process "
                             "running that MTA can open")
        if not unsynced:
            refuse_other_index(real_directory)
        try:
            db = apsw.Connection(os.path.join(real_directory, DATABASE_NAME),
                                 flags=flags | apsw.SQLITE_OPEN_NOFOLLOW, vfs=TEST_QUEUE_VFS if unsynced else None)
            db.set_busy_handler(patient(busy_timeout))
            if unsynced:  # a test queue, deleted after its last close: no checkpoint into it then
                db.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
            if new:
                os.chmod(path, 0o600)  # by path: never a descriptor of our own (SQLite gives -wal/-shm this mode)
            cursor = db.cursor()
            if not readonly:
                cursor.execute("PRAGMA journal_mode = WAL")
                cursor.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT:d}")
            cursor.execute("PRAGMA synchronous = OFF" if unsynced else "PRAGMA synchronous = FULL")
            cursor.execute("PRAGMA foreign_keys = ON")
            store = cls(db, path)
            store.unsafe_unsynced = unsynced
            store.busy_timeout = busy_timeout
            store._migrate(readonly)
        except apsw.Error as exc:
            raise QueueError(f"{path}: {exc}") from None
        except OSError as exc:
            raise QueueError(f"{path}: {exc.strerror}") from None
        if not readonly and not unsynced:  # a throw-away test queue is never restored from a backup
            write_stamp(store.path)
        return store

    def close(self) -> None:
        self.db.close()
        wal, self._wal = self._wal, None
        if wal is not None:
            os.close(wal)

    def sync_commits_itself(self) -> None:
        """From now on COMMIT never fsyncs (``synchronous = NORMAL``), and the caller
        runs ``sync_wal`` after a durable commit: the fsync outside the write lock (see
        the module's docstring).  Call it outside a transaction, on a writing
        connection that has read the database (the WAL file exists).  A test queue
        (``synchronous = OFF``) stays as it is; so does a connection whose WAL file
        cannot be opened as a regular file (it keeps FULL: just as safe, only slower)."""
        if self.unsafe_unsynced or self._wal is not None:
            return
        try:  # root may open it before the privilege drop: never through a planted link or FIFO
            wal = open_regular_for_reading(self.db.filename_wal)
        except OSError:
            wal = None
        if wal is None:
            return
        self.set_durable(False)
        self._wal = wal

    def sync_wal(self) -> None:
        """After a durable commit on a connection that ``sync_commits_itself``: fsync
        the WAL, which makes everything committed so far durable (OSError when that
        fails).  On any other connection its COMMIT already did: nothing to do."""
        if self._wal is not None:
            os.fdatasync(self._wal)
            self.wal_syncs += 1

    def set_durable(self, durable: bool) -> None:
        """Whether COMMIT fsyncs (FULL) or leaves it to the next one that does (NORMAL).
        In WAL mode both are atomic; only the durability of the last commits differs.
        A connection that ``sync_commits_itself`` stays NORMAL: its caller fsyncs."""
        if durable != self.durable and not self.unsafe_unsynced and self._wal is None:
            self.db.execute("PRAGMA synchronous = FULL" if durable else "PRAGMA synchronous = NORMAL")
            self.durable = durable

    def _migrate(self, readonly: bool) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise QueueError(f"{self.path}: schema version {version} is newer than this trimail ({SCHEMA_VERSION})")
        if version == SCHEMA_VERSION:
            return
        if readonly:
            raise QueueError(f"{self.path}: schema version {version} needs upgrading; start trimail serve first")
        with self.transaction():
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            for number in range(version, SCHEMA_VERSION):
                self.db.execute(MIGRATIONS[number])
                self.db.execute(f"PRAGMA user_version = {number + 1:d}")  # a pragma takes no parameters

    @contextmanager
    def transaction(self, begun: bool = False) -> Iterator[None]:
        """``BEGIN IMMEDIATE`` (unless *begun*: the caller did) ... ``COMMIT`` (fsynced
        unless set_durable(False)), rolled back on error."""
        if not begun:
            self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException:
            # also when COMMIT itself failed (disk full, I/O error, busy): a failed
            # COMMIT may leave the transaction open, and the next BEGIN would fail
            self.rollback()
            raise

    def rollback(self) -> None:
        """End the open transaction, if any; never raises (the connection may be
        the thing that failed, and the caller is already handling an error)."""
        try:
            if not self.db.getautocommit():
                self.db.execute("ROLLBACK")
        except apsw.Error:
            pass

    def checkpoint(self, mode: Literal["PASSIVE", "RESTART", "TRUNCATE"] = "TRUNCATE") -> tuple[bool, int, int]:
        """Copy the WAL into the database; returns (complete, WAL frames, frames
        checkpointed).  Not complete: another checkpoint was under way, or readers or
        a writer kept a RESTART or TRUNCATE one from finishing (a PASSIVE one copies
        what readers allow and says so only in the counts).  TRUNCATE also empties the WAL.  PASSIVE (under load)
        takes no lock, so nobody's commit (and 250) waits for its copy and fsyncs.
        RESTART takes the write lock for what is left to copy, and makes sure no
        reader is in the WAL, so that the next writer writes it from its start
        (``queue.writer``: the checkpoint under load)."""
        # Never wait for readers: a long read (a backup, a listing of a big queue)
        # would otherwise hold the writer, and every pending 250, for the busy timeout.
        self.db.set_busy_timeout(0)
        try:
            row = self.db.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        finally:
            self.db.set_busy_handler(patient(self.busy_timeout))
        return not row[0], int(row[1]), int(row[2])

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """A nested unit inside a transaction: one request of a group commit."""
        self.db.execute("SAVEPOINT request")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK TO request")
            self.db.execute("RELEASE request")
            raise
        self.db.execute("RELEASE request")

    @contextmanager
    def read_snapshot(self) -> Iterator[None]:
        """Several SELECTs that see one consistent state of the queue."""
        if not self.db.in_transaction:
            self.db.execute("BEGIN")
            try:
                yield
            finally:
                self.db.execute("COMMIT")
        else:
            yield
