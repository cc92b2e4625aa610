"""The address verification cache: verify(8)'s ``address_verify_map``, in SQLite.

One small database shared by every process of a serve (each smtpd worker and the
qmgr worker open their own connection), so an answer one worker's probe got
answers the same question in every other worker, and survives a reload, a stop
and a restart.  Each row is Postfix's verify(8) record: the status of the last
probe (``ok``, ``bounce``, ``defer``; NULL while the first probe of the address
runs), its text, when it came (``updated``) and, while a probe runs somewhere, the
deadline of that probe's mark (``probing_until``): a second worker that finds the
mark answers "in progress" and does not probe again, and a worker that died
mid-probe holds the address only until that deadline.  What the statuses mean and
when they expire is the policy's business (trimail.policy.verify); this module
only keeps them, atomically.

Why a file of its own rather than a table in the queue database: the cache is not
mail.  The queue commits with ``synchronous = FULL`` and has one writer lock
shared by every smtpd worker's group commit and the qmgr; cache writes there would
wait for, and delay, those commits.  Here a lost write after a power loss costs at
most one more probe, so ``synchronous = NORMAL`` (no fsync at commit), and the
cache's writes never touch the queue's lock, WAL or backups (``trimail queue
backup`` copies mail, not a cache).  Like Postfix's ``btree:`` cache, the file can
be deleted while serve is stopped; it is made again.

``address_verify_map`` names the file: ``btree:/path/name`` (Postfix's default form;
the file is ``/path/name.db``, as ``hash:`` tables are ``FILE.db``) or an absolute
file name; empty keeps the cache in the memory of each process (lost at stop, not
shared; Postfix's volatile cache).  Other table types are a configuration error.

Every failure of the database (a file that cannot be created or written, a corrupt
file, a lock held past the busy timeout) is a ``VerifyCacheError`` naming the file;
the connection is dropped and opened again at the next use, so a file the operator
repaired or removed is taken without a restart.

Security notes: the addresses stored are what the resolver made of a client's
RCPT, bounded by the SMTP parser; the text is the probe's classified reply
(printable, bounded).  Nothing here builds SQL from data.  The file is created with
the process's umask by mail_owner (the workers open it after dropping privileges),
inside the jail with ``chroot = yes`` (the default is under ``queue_directory``).
The number of rows is bounded (``record``'s *size*: the oldest results go first).

Parameters (read by trimail.policy.verify and passed in): address_verify_map,
address_verify_cache_size, queue_busy_timeout.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager

import apsw

from trimail.errors import OperationalError

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE verify (
    address TEXT PRIMARY KEY,
    status TEXT CHECK (status IN ('ok', 'bounce', 'defer')),
    text TEXT NOT NULL DEFAULT '',
    updated REAL NOT NULL DEFAULT 0,
    probing_until REAL NOT NULL DEFAULT 0
) STRICT, WITHOUT ROWID;
CREATE INDEX verify_updated ON verify (updated);
CREATE TABLE cleanup (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    last_done REAL NOT NULL
) STRICT;
"""


class VerifyCacheError(OperationalError):
    """The cache cannot be read or written now; ``str()`` names the file."""


@contextmanager
def _immediate(db: apsw.Connection) -> Iterator[None]:
    """A write transaction that takes the lock first (waiting in the busy handler):
    a read-then-write in a deferred one fails, without waiting, when another
    process committed in between (WAL's busy snapshot)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if not db.get_autocommit():  # SQLite may have rolled it back already
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


@dataclasses.dataclass(frozen=True, slots=True)
class Entry:
    status: str | None  # "ok", "bounce", "defer"; None: no result yet (a first probe runs)
    text: str
    updated: float  # when the result came (0: none yet)
    probing_until: float  # a probe runs (in some process) until then (0: none)


@functools.lru_cache(maxsize=64)  # read at each check of the value, each start and each reload
def cache_file(reference: str) -> str | None:
    """The file an ``address_verify_map`` value names (None: in memory); ValueError
    for anything else, in the words ``trimail config`` and serve's start print."""
    text = reference.strip()
    if not text:
        return None
    kind, sep, name = text.partition(":")
    if sep and kind == "btree":
        path = name
        suffix = ".db"
    elif text.startswith("/"):
        path, suffix = text, ""
    else:
        raise ValueError(f"unsupported address verification cache {text!r} (trimail keeps it in SQLite: use "
                         "btree:/path/name for /path/name.db, an absolute file name, or nothing for a cache in "
                         "memory)")
    if not path.startswith("/"):
        raise ValueError(f"address verification cache {text!r}: the file name must be absolute")
    return os.path.normpath(path) + suffix


def parse_map(text: str) -> str:
    """The registry's parser: *text* as written, once ``cache_file`` accepts it."""
    cache_file(text)
    return text.strip()


class VerifyCache:
    """One connection to the cache (not thread-safe: one call at a time; the
    policy runs them in a thread, one after another)."""

    def __init__(self, path: str | None, busy_timeout: float = 5.0) -> None:
        self.path = path
        self.name = str(path) if path is not None else "(memory)"
        self.busy_timeout = busy_timeout
        self._db: apsw.Connection | None = None

    def _open(self) -> apsw.Connection:
        # imported here: trimail.config imports this module (parse_map), and the store is slow to import
        from trimail.queue.database import patient

        name = str(self.path) if self.path is not None else ":memory:"
        db = apsw.Connection(name, flags=apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE
                             | apsw.SQLITE_OPEN_NOFOLLOW)
        try:
            db.set_busy_handler(patient(self.busy_timeout))
            cursor = db.cursor()
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")  # a cache: a lost write costs one probe
            version = cursor.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                with _immediate(db):  # a second process that raced us finds it made
                    if cursor.execute("PRAGMA user_version").fetchone()[0] == 0:
                        cursor.execute(SCHEMA)
                        cursor.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")
            elif version != SCHEMA_VERSION:
                raise VerifyCacheError(f"{self.name}: cache version {version}, this trimail knows "
                                       f"{SCHEMA_VERSION} (remove the file: it is only a cache)")
        except BaseException:
            db.close()
            raise
        return db

    def _run(self, work):
        """*work(db)* with the connection, opened on first use; any database error
        drops the connection (the next call opens it again) and is a VerifyCacheError."""
        try:
            if self._db is None:
                self._db = self._open()
            return work(self._db)
        except VerifyCacheError:
            self.close()
            raise
        except apsw.Error as exc:
            self.close()
            raise VerifyCacheError(f"{self.name}: {exc}") from None
        except OSError as exc:
            self.close()
            raise VerifyCacheError(f"{self.name}: {exc.strerror or exc}") from None

    def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            try:
                db.close()
            except apsw.Error:
                pass

    def lookup(self, address: str) -> Entry | None:
        def work(db: apsw.Connection) -> Entry | None:
            row = db.execute("SELECT status, text, updated, probing_until FROM verify WHERE address = ?",
                             (address,)).fetchone()
            return None if row is None else Entry(*row)

        return self._run(work)

    def claim(self, address: str, seen_updated: float, now: float, until: float) -> bool:
        """Mark a probe of *address* as running until *until*, if no other probe's mark
        stands and the entry is still the one the caller saw (``updated`` unchanged):
        True when this caller is the one to probe."""
        def work(db: apsw.Connection) -> bool:
            with _immediate(db):
                db.execute(
                    "INSERT INTO verify (address, probing_until) VALUES (:address, :until) "
                    "ON CONFLICT (address) DO UPDATE SET probing_until = :until "
                    "WHERE probing_until < :now AND updated = :seen",
                    {"address": address, "until": until, "now": now, "seen": seen_updated})
                return db.changes() == 1

        return self._run(work)

    def release(self, address: str) -> None:
        """A probe ended with nothing worth keeping: its mark goes, the entry stays
        (a mark without any result goes altogether)."""
        def work(db: apsw.Connection) -> None:
            with _immediate(db):
                db.execute("DELETE FROM verify WHERE address = ? AND status IS NULL", (address,))
                db.execute("UPDATE verify SET probing_until = 0 WHERE address = ?", (address,))

        self._run(work)

    def record(self, address: str, status: str, text: str, now: float, *, keep_ok_until: float,
               keep_failures: bool, size: int) -> bool:
        """A probe's result.  A failed probe never replaces a deliverable result
        updated after *keep_ok_until* (Postfix's optimistic caching: its mark stays,
        so the address is probed again only after the mark's deadline); with
        *keep_failures* false a failure is not stored at all.  At most *size* rows
        are kept, the oldest results going first.  True when the result was stored."""
        def work(db: apsw.Connection) -> bool:
            with _immediate(db):
                row = db.execute("SELECT status, updated FROM verify WHERE address = ?", (address,)).fetchone()
                if status != "ok":
                    if row is not None and row[0] == "ok" and row[1] >= keep_ok_until:
                        return False
                    if not keep_failures:
                        db.execute("DELETE FROM verify WHERE address = ?", (address,))
                        return False
                db.execute(
                    "INSERT INTO verify (address, status, text, updated, probing_until) VALUES (?, ?, ?, ?, 0) "
                    "ON CONFLICT (address) DO UPDATE SET status = excluded.status, text = excluded.text, "
                    "updated = excluded.updated, probing_until = 0", (address, status, text, now))
                if row is None or row[0] is None:  # a new address (or only its probe's mark): keep the bound
                    excess = db.execute("SELECT count(*) FROM verify").fetchone()[0] - max(size, 1)
                    if excess > 0:
                        db.execute("DELETE FROM verify WHERE address IN (SELECT address FROM verify "
                                   "WHERE probing_until < ? ORDER BY updated LIMIT ?)", (now, excess))
                return True

        return self._run(work)

    def cleanup_due(self, now: float, interval: float) -> float:
        """Seconds until the next cleanup run is due (0: now): *interval* after the
        last one completed, by whichever process (Postfix's dict_cache)."""
        def work(db: apsw.Connection) -> float:
            row = db.execute("SELECT last_done FROM cleanup WHERE id = 1").fetchone()
            return 0.0 if row is None else max(0.0, min(interval, row[0] + interval - now))

        return self._run(work)

    def cleanup(self, now: float, positive_expire: float, negative_expire: float) -> tuple[int, int]:
        """Drop expired results and lapsed marks (never an entry whose probe runs);
        returns (retained, dropped) and notes the run's completion."""
        def work(db: apsw.Connection) -> tuple[int, int]:
            with _immediate(db):
                db.execute(
                    "DELETE FROM verify WHERE probing_until < :now AND (status IS NULL "
                    "OR (status = 'ok' AND updated < :now - :positive) "
                    "OR (status != 'ok' AND updated < :now - :negative))",
                    {"now": now, "positive": positive_expire, "negative": negative_expire})
                dropped = db.changes()
                retained = db.execute("SELECT count(*) FROM verify").fetchone()[0]
                db.execute("INSERT INTO cleanup (id, last_done) VALUES (1, ?) "
                           "ON CONFLICT (id) DO UPDATE SET last_done = excluded.last_done", (now,))
                return retained, dropped

        return self._run(work)
