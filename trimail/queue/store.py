"""The queue database: opening it safely, and every read and state transition.

Durability (RFC 5321 section 6.1: after ``250`` the message must survive a crash):
WAL journal with ``synchronous=FULL`` on every writing connection, so a COMMIT
returns only after the WAL is fsynced.  Writers use ``BEGIN IMMEDIATE`` and wait
for the lock in short steps up to a busy timeout in seconds (``patient``), so
``trimail sendmail``, the smtpd workers and the qmgr worker share the file.

Every transition is ``UPDATE ... WHERE id = ? AND state = ?`` with a row-count
check; rows are never dequeued by delete until all recipients are done.  No SQL is
built with string formatting.

Security notes: the queue directory is created 0700 and the database 0600 (SQLite
gives its -wal and -shm files the same mode); nothing here takes a path from mail.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import json
import os
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import apsw

from trimail.errors import StorageError, TrimailError
from trimail.queue.schema import MIGRATIONS, SCHEMA_VERSION
from trimail.queue.spool import Spool

DATABASE_NAME = "queue.db"
BUSY_TIMEOUT_MS = 30_000
BLOB_CHUNK = 1 << 20
JOURNAL_SIZE_LIMIT = 64 << 20  # the WAL is truncated to this after a checkpoint


class QueueError(TrimailError):
    """A queue problem an operator must see (bad directory, newer schema, ...)."""


class TransitionError(QueueError):
    """A state transition found the row in another state than expected."""


@dataclasses.dataclass(slots=True)
class NewMessage:
    """A message ready to be committed: envelope, content and client facts."""

    id: str
    sender: str
    recipients: list[str]
    content: Spool
    state: str = "incoming"
    arrival_time: float = dataclasses.field(default_factory=time.time)
    client_address: str = ""
    client_name: str = ""
    helo_name: str = ""
    protocol: str = ""
    params: dict[str, str | None] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(slots=True)
class RecipientInfo:
    address: str
    status: str
    attempts: int
    next_attempt: float | None
    last_reply: str | None

    def to_json(self) -> dict[str, object]:
        return {
            "address": self.address,
            "status": self.status,
            "attempts": self.attempts,
            "next_attempt": rfc3339(self.next_attempt),
            "last_reply": self.last_reply,
        }


@dataclasses.dataclass(slots=True)
class MessageInfo:
    id: str
    state: str
    sender: str
    arrival_time: float
    size: int
    recipients: list[RecipientInfo]

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "state": self.state,
            "sender": self.sender,
            "arrival_time": rfc3339(self.arrival_time),
            "size": self.size,
            "recipients": [r.to_json() for r in self.recipients],
        }


def _not_done(message: MessageInfo) -> bool:
    return any(r.status in ("pending", "deferred") for r in message.recipients)


def rfc3339(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


STAMP_NAME = "queue.stamp"


def prepare_directory(queue_directory: Path) -> Path:
    """Create the queue directory 0700 (or tighten it) and return the database path.

    The database file itself is never opened here: only SQLite opens it (see
    ``Store.open``), because closing any descriptor of the file would drop the
    POSIX locks that serve's connections hold on it."""
    try:
        queue_directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        mode = stat.S_IMODE(queue_directory.stat().st_mode)
        if mode & 0o077:
            os.chmod(queue_directory, 0o700)
    except OSError as exc:
        raise QueueError(f"queue_directory {queue_directory}: {exc.strerror}") from None
    return queue_directory / DATABASE_NAME


def _check_not_lost(path: Path) -> bool:
    """Whether the database must be created; refuse when it should exist and does not.

    ``queue.stamp`` is written once the database exists.  A missing or zero-length
    ``queue.db`` beside a stamp means the queue was deleted or truncated: SQLite
    would silently start an empty queue, and every queued message would be gone
    without a word, so we refuse instead."""
    stamp = path.parent / STAMP_NAME
    try:
        size: int | None = path.stat().st_size
    except FileNotFoundError:
        size = None
    except OSError as exc:
        raise QueueError(f"{path}: {exc.strerror}") from None
    if size:
        return False
    if stamp.exists():
        what = "missing" if size is None else "empty (zero length)"
        raise QueueError(f"{path}: {what}, but this queue directory held a queue ({stamp} exists): restore "
                         f"{DATABASE_NAME} from a backup (trimail queue backup), or remove {stamp} to start "
                         "with an empty queue")
    return True


def _write_stamp(path: Path) -> None:
    stamp = path.parent / STAMP_NAME
    if not stamp.exists():
        try:
            fd = os.open(stamp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with open(fd, "w") as out:  # O_EXCL: never through a planted (dangling) link
                out.write(f"queue database created {rfc3339(time.time())}\n")
        except OSError as exc:
            raise QueueError(f"{stamp}: {exc.strerror}") from None


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


class Store:
    """One connection to the queue database (not thread-safe: one thread each)."""

    def __init__(self, connection: apsw.Connection, path: Path) -> None:
        self.db = connection
        self.path = path
        self.durable = True  # PRAGMA synchronous = FULL (set in open)
        self.busy_timeout = BUSY_TIMEOUT_MS / 1000

    @classmethod
    def open(cls, queue_directory: str | os.PathLike[str], *, readonly: bool = False,
                 busy_timeout: float = BUSY_TIMEOUT_MS / 1000) -> Store:
        """Connect to the queue database.

        A writing connection makes the directory and, when there is none yet (and
        ``queue.stamp`` does not say there was one), the database.  The file is only
        ever opened by SQLite: see ``prepare_directory``."""
        directory = Path(queue_directory)
        path = directory / DATABASE_NAME
        if readonly:
            if not path.exists():
                raise QueueError(f"{path}: no queue database (has trimail serve run with this queue_directory?)")
            flags = apsw.SQLITE_OPEN_READWRITE  # a reader still writes the -shm index (WAL)
            new = False
        else:
            prepare_directory(directory)
            new = _check_not_lost(path)
            flags = apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE
        # root opens this before the privilege drop in a directory mail_owner owns:
        # never through a planted link (the directory's own path is the operator's)
        real = Path(os.path.realpath(directory)) / DATABASE_NAME
        try:
            db = apsw.Connection(str(real), flags=flags | apsw.SQLITE_OPEN_NOFOLLOW)
            db.set_busy_handler(patient(busy_timeout))
            if new:
                os.chmod(path, 0o600)  # by path: never a descriptor of our own (SQLite gives -wal/-shm this mode)
            cursor = db.cursor()
            if not readonly:
                cursor.execute("PRAGMA journal_mode = WAL")
                cursor.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT:d}")
            cursor.execute("PRAGMA synchronous = FULL")
            cursor.execute("PRAGMA foreign_keys = ON")
            store = cls(db, path)
            store.busy_timeout = busy_timeout
            store._migrate(readonly)
        except apsw.Error as exc:
            raise QueueError(f"{path}: {exc}") from None
        except OSError as exc:
            raise QueueError(f"{path}: {exc.strerror}") from None
        if not readonly:
            _write_stamp(path)
        return store

    def close(self) -> None:
        self.db.close()

    def set_durable(self, durable: bool) -> None:
        """Whether COMMIT fsyncs (FULL) or leaves it to the next one that does (NORMAL).
        In WAL mode both are atomic; only the durability of the last commits differs."""
        if durable != self.durable:
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
    def transaction(self) -> Iterator[None]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (fsynced unless set_durable(False)), rolled back on error."""
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

    def checkpoint(self) -> tuple[int, int]:
        """Copy the WAL into the database and truncate it (when no reader needs
        it); returns (WAL frames, frames checkpointed).  Busy readers make it
        partial, never wrong."""
        # Never wait for readers: a long read (a backup, a listing of a big queue)
        # would otherwise hold the writer, and every pending 250, for the busy timeout.
        self.db.set_busy_timeout(0)
        try:
            row = self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            self.db.set_busy_handler(patient(self.busy_timeout))
        return int(row[1]), int(row[2])

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

    # -- writes --------------------------------------------------------------

    def insert_message(self, msg: NewMessage) -> None:
        """Insert envelope, recipients and content (call inside a transaction)."""
        db = self.db
        size = msg.content.size
        db.execute(
            "INSERT INTO message (id, state, sender, arrival_time, next_attempt, size, client_address,"
            " client_name, helo_name, protocol, params) VALUES (?, ?, ?, ?, NULL, ?, ?, ?, ?, ?, ?)",
            (msg.id, msg.state, msg.sender, msg.arrival_time, size, msg.client_address, msg.client_name,
             msg.helo_name, msg.protocol, json.dumps(msg.params)),
        )
        db.executemany(
            "INSERT INTO recipient (message_id, seq, address) VALUES (?, ?, ?)",
            [(msg.id, seq, address) for seq, address in enumerate(msg.recipients)],
        )
        in_memory = msg.content.getvalue()
        if in_memory is not None:
            db.execute("INSERT INTO body (message_id, content) VALUES (?, ?)", (msg.id, in_memory))
            return
        db.execute("INSERT INTO body (message_id, content) VALUES (?, zeroblob(?))", (msg.id, size))
        rowid = db.last_insert_rowid()
        with db.blob_open("main", "body", "content", rowid, True) as blob:
            for chunk in msg.content.chunks(BLOB_CHUNK):
                blob.write(chunk)

    def recover_active(self) -> int:
        """After a crash, messages left ``active`` go back to ``incoming`` (as qmgr does)."""
        self.db.execute("UPDATE message SET state = 'incoming' WHERE state = 'active'")
        return self.db.changes()

    def transition(self, queue_id: str, expected: str, new: str) -> None:
        self.db.execute("UPDATE message SET state = ? WHERE id = ? AND state = ?", (new, queue_id, expected))
        if self.db.changes() != 1:
            raise TransitionError(f"{queue_id}: not in state {expected}")

    # -- reads ---------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Messages per state (states with none left out), from the counts the
        triggers keep: five rows read, however long the queue."""
        rows = self.db.execute("SELECT state, messages FROM queue_count WHERE messages != 0")
        return {state: count for state, count in rows}

    def oldest_arrival(self) -> float | None:
        """The oldest message's arrival time (one step down the ``message_arrival`` index)."""
        return self.db.execute("SELECT min(arrival_time) FROM message").fetchone()[0]

    def iter_messages(self) -> Iterator[MessageInfo]:
        """Like list_messages(), but streamed: one pass over both tables in queue-ID
        order, so the first message comes out at once however long the queue is."""
        with self.read_snapshot():
            rows = self.db.execute(
                "SELECT m.id, m.state, m.sender, m.arrival_time, m.size, r.address, r.status, r.attempts,"
                " r.next_attempt, r.last_reply FROM message AS m JOIN recipient AS r ON r.message_id = m.id"
                " ORDER BY m.id, r.seq")
            current: MessageInfo | None = None
            for message_id, state, sender, arrival, size, *recipient in rows:
                if current is None or current.id != message_id:
                    if current is not None and _not_done(current):
                        yield current
                    current = MessageInfo(message_id, state, sender, arrival, size, recipients=[])
                current.recipients.append(RecipientInfo(*recipient))
            if current is not None and _not_done(current):
                yield current

    def list_messages(self) -> list[MessageInfo]:
        """Queued messages with at least one recipient not yet done, oldest first."""
        messages: dict[str, MessageInfo] = {}
        with self.read_snapshot():
            for row in self.db.execute(
                "SELECT id, state, sender, arrival_time, size FROM message ORDER BY id"
            ):
                messages[row[0]] = MessageInfo(*row, recipients=[])
            for message_id, *fields in self.db.execute(
                "SELECT message_id, address, status, attempts, next_attempt, last_reply"
                " FROM recipient ORDER BY message_id, seq"
            ):
                info = messages.get(message_id)
                if info is not None:
                    info.recipients.append(RecipientInfo(*fields))
        return [m for m in messages.values()
                if any(r.status in ("pending", "deferred") for r in m.recipients)]

    def get_message(self, queue_id: str) -> MessageInfo | None:
        for info in self.list_messages_by_id([queue_id]):
            return info
        return None

    def list_messages_by_id(self, ids: list[str]) -> list[MessageInfo]:
        found = []
        with self.read_snapshot():
            for queue_id in ids:
                row = self.db.execute(
                    "SELECT id, state, sender, arrival_time, size FROM message WHERE id = ?", (queue_id,)
                ).fetchone()
                if row is None:
                    continue
                recipients = [RecipientInfo(*r) for r in self.db.execute(
                    "SELECT address, status, attempts, next_attempt, last_reply FROM recipient"
                    " WHERE message_id = ? ORDER BY seq", (queue_id,))]
                found.append(MessageInfo(*row, recipients=recipients))
        return found

    def read_content(self, queue_id: str) -> bytes | None:
        row = self.db.execute("SELECT content FROM body WHERE message_id = ?", (queue_id,)).fetchone()
        return None if row is None else bytes(row[0])

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
