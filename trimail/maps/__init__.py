"""Lookup tables (``type:name``), one interface for every ``*_maps`` parameter.

``open_table("hash:/etc/trimail/transport")`` returns a ``Table`` whose
``lookup(key)`` gives the value or None.  Types so far:

- ``inline:{ key=value, key2=value2 }`` — the table is in the parameter itself.
- ``texthash:/path`` — the source file read directly (no compilation).
- ``hash:/path`` and ``btree:/path`` — ``/path.db``, an indexed SQLite database that
  ``trimail postmap /path`` compiles from the source file, atomically.
- ``cidr:/path``, ``regexp:/path`` (and ``pcre:``) — see ``trimail.maps.patterns``.
- ``static:value`` — every key maps to *value*.
- ``unix:passwd.byname`` — the system's user database (NSS).

Source syntax (postmap(1)): ``key whitespace value``; lines starting with white
space continue the previous entry; ``#`` starts a comment line; the first of
duplicate keys wins (with a warning).  Keys are folded to lower case, as Postfix
does for these table types.  File tables notice a changed file (checked at most
once a second, by inode, size and mtime) and reload without a restart.

Concurrency: ``lookup`` is safe from any thread.  A file table answers from an
in-memory snapshot (or, for ``hash:``, one read-only SQLite connection behind a
lock) that a reload replaces whole; one thread reloads at a time and the others
keep answering from the old snapshot meanwhile, so a rebuild by ``postmap`` or
``newaliases`` never shows a half-read table or closes a connection in use.  A
thread waits at most ``LOCK_WAIT`` seconds for another thread's first load or
query of the same table (then ``TableError``), so a read stuck for good holds one
thread, not all of them.

Blocking: ``Table.may_block()`` says whether the next lookup may wait on a disk
or a name service (a reload is due, a ``hash:`` query, ``unix:passwd``).  Code on
the event loop calls ``await off_loop(tables, fn, ...)``, which runs *fn* (the
lookups) right there when no table may block, and otherwise on a worker thread
(at most ``LOOKUP_THREADS`` at once) with a time limit (``table_lookup_timeout``):
one slow NSS or disk stalls the session that asked, never the others, and a
lookup that does not return in time is a ``TableError`` (``451 4.3.0``).  Tables
opened with ``lazy=True`` read nothing until their first lookup, so opening one
on the event loop never blocks either.

Security notes: table files are read as text and never executed; the compiled
database is opened read-only; every apsw and OS error is mapped to
``TableError`` (a temporary ``LookupFailure``): mail waits, it never bounces and
nothing ends the daemon.
"""

from __future__ import annotations

import functools
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import apsw

from trimail.config.values import split_list
from trimail.maps.patterns import (
    CidrRules,
    RegexpRules,
    match_cidr,
    match_regexp,
    parse_cidr,
    parse_regexp,
)
from trimail.maps.source import (
    TableError,
    compile_table,
    compiled_path,
    fsync_path,
    logical_lines,
    parse_source,
    postmap,
)
from trimail.supervise import thread_pool

__all__ = ["RECHECK_SECONDS", "Table", "TableError", "compile_table", "compiled_path", "fsync_path",
           "logical_lines", "lookup_first", "off_loop", "open_table", "parse_source", "postmap"]

RECHECK_SECONDS = 1.0
LOOKUP_THREADS = 10  # worker threads for lookups that may block, per serve
DEFAULT_LOOKUP_TIMEOUT = 20.0
LOCK_WAIT = 5.0  # longest wait for another thread's reload or query of the same table

T = TypeVar("T")
D = TypeVar("D")


class Table:
    ref: str

    def lookup(self, key: str) -> str | None:
        raise NotImplementedError

    def may_block(self) -> bool:
        """Whether the next lookup may wait on a disk or a name service."""
        return False

    def entries(self) -> Iterator[tuple[str, str]]:
        """Every (key, value) of the table (``postmap -s``); tables that cannot list
        their entries (patterns, static:, unix:) say so, in Postfix's words."""
        raise TableError(f"table {self.ref}: sequence operation is not supported")


class InlineTable(Table):
    def __init__(self, ref: str, body: str) -> None:
        self.ref = ref
        self.pairs: dict[str, str] = {}
        text = body.strip()
        if not (text.startswith("{") and text.endswith("}")):
            raise TableError(f"{ref}: use inline:{{ key=value, ... }}")
        for item in split_list(text[1:-1]):
            key, sep, value = _unbrace(item).partition("=")
            if not sep or not key.strip():
                raise TableError(f"{ref}: bad entry {item!r} (use key=value)")
            self.pairs.setdefault(key.strip().lower(), _unbrace(value.strip()))

    def lookup(self, key: str) -> str | None:
        return self.pairs.get(key.lower())

    def entries(self) -> Iterator[tuple[str, str]]:
        return iter(list(self.pairs.items()))


class StaticTable(Table):
    def __init__(self, ref: str, value: str) -> None:
        self.ref = ref
        self.value = _unbrace(value.strip())

    def lookup(self, key: str) -> str | None:
        return self.value


class _FileTable(Table, Generic[D]):
    """A table backed by a file that may change under us: answers from a snapshot
    of type D, replaced whole when the file's identity (inode, size, mtime) changes."""

    def __init__(self, ref: str, path: Path, *, lazy: bool = False) -> None:
        self.ref = ref
        self.path = path
        self._reload = threading.Lock()  # one reload at a time
        self._data: D | None = None
        self._stamp: tuple[int, ...] | None = None
        self._failure: TableError | None = None
        self._checked = -math.inf
        if not lazy:
            self._refresh()
            if self._failure is not None:
                raise self._failure

    def _watched(self) -> Path:
        return self.path

    def may_block(self) -> bool:
        return self._data is None or time.monotonic() - self._checked >= RECHECK_SECONDS

    def _refresh(self) -> None:
        # with a snapshot in hand, never wait for another thread's reload: answer from it;
        # without one, wait a bounded time, so a read stuck for good (a hung disk) holds
        # one lookup thread, not every thread that asks after it
        if self._data is None:
            if not self._reload.acquire(timeout=LOCK_WAIT):
                raise TableError(f"{self.ref}: still loading {self._watched()}")
        elif not self._reload.acquire(blocking=False):
            return
        try:
            if (self._data is not None or self._failure is not None) and \
                    time.monotonic() - self._checked < RECHECK_SECONDS:
                return  # another thread reloaded while we waited for the lock
            self._checked = time.monotonic()
            try:
                stamp = self._stat()
                if stamp != self._stamp or self._data is None:
                    self._install(self._load())
                    self._stamp = stamp
                self._failure = None
            except TableError as exc:
                self._failure = exc
            self._checked = time.monotonic()
        finally:
            self._reload.release()

    def _stat(self) -> tuple[int, ...]:
        try:
            st = os.stat(self._watched())
        except OSError as exc:
            raise TableError(f"{self.ref}: cannot open {self._watched()}: {exc.strerror}") from None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def _install(self, data: D) -> None:
        self._data = data

    def _current(self) -> D:
        """The snapshot to answer from, after a reload when one is due."""
        if self.may_block():
            self._refresh()
        failure, data = self._failure, self._data
        if failure is not None:
            raise failure
        if data is None:
            raise TableError(f"{self.ref}: not loaded yet")
        return data

    def _load(self) -> D:
        raise NotImplementedError

    def lookup(self, key: str) -> str | None:
        return self._get(self._current(), key.lower())

    def _get(self, data: D, key: str) -> str | None:
        raise NotImplementedError


class TextHashTable(_FileTable[dict[str, str]]):
    def _load(self) -> dict[str, str]:
        entries: dict[str, str] = {}
        for key, value, _ in parse_source(self.path):
            entries.setdefault(key, value)
        return entries

    def _get(self, data: dict[str, str], key: str) -> str | None:
        return data.get(key)

    def entries(self) -> Iterator[tuple[str, str]]:
        return iter(list(self._current().items()))


class HashTable(_FileTable[apsw.Connection]):
    """A compiled table: ``path.db`` (SQLite, one indexed key column), read through
    one read-only connection that a lock keeps to one thread at a time."""

    def __init__(self, ref: str, path: Path, *, lazy: bool = False) -> None:
        self._query = threading.Lock()
        super().__init__(ref, path, lazy=lazy)

    def _watched(self) -> Path:
        return compiled_path(self.path)

    def _load(self) -> apsw.Connection:
        db_path = compiled_path(self.path)
        try:
            db = apsw.Connection(f"file:{db_path}?mode=ro&immutable=1",
                                 flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
        except apsw.Error as exc:
            raise TableError(f"{self.ref}: cannot open {db_path}: {exc}; run trimail postmap") from None
        try:
            db.execute("SELECT value FROM map WHERE key = ''").fetchall()
        except apsw.Error as exc:
            db.close()
            raise TableError(f"{self.ref}: {db_path} is not a trimail table ({exc}); run trimail postmap") from None
        return db

    def _install(self, data: apsw.Connection) -> None:
        with self._query:  # nobody is inside a query on the old connection
            old, self._data = self._data, data
            if old is not None:
                old.close()

    def _get(self, data: apsw.Connection, key: str) -> str | None:
        if not self._query.acquire(timeout=LOCK_WAIT):
            raise TableError(f"{self.ref}: {compiled_path(self.path)} does not answer")
        try:
            db = self._data
            assert db is not None
            row = db.execute("SELECT value FROM map WHERE key = ?", (key,)).fetchone()
        except apsw.Error as exc:
            raise TableError(f"{self.ref}: cannot read {compiled_path(self.path)}: {exc}") from None
        finally:
            self._query.release()
        return None if row is None else str(row[0])

    def entries(self) -> Iterator[tuple[str, str]]:
        """In key order, streamed (a dump holds the query lock until it ends)."""
        self._current()
        if not self._query.acquire(timeout=LOCK_WAIT):
            raise TableError(f"{self.ref}: {compiled_path(self.path)} does not answer")
        try:
            db = self._data
            assert db is not None
            for key, value in db.execute("SELECT key, value FROM map ORDER BY key"):
                yield str(key), str(value)
        except apsw.Error as exc:
            raise TableError(f"{self.ref}: cannot read {compiled_path(self.path)}: {exc}") from None
        finally:
            self._query.release()


class CidrTable(_FileTable[CidrRules]):
    """``cidr:/path`` (cidr_table(5)): ``network/prefix result`` lines, first match wins."""

    def _load(self) -> CidrRules:
        return parse_cidr(self.path)

    def _get(self, data: CidrRules, key: str) -> str | None:
        return match_cidr(data, key)


class RegexpTable(_FileTable[RegexpRules]):
    """``regexp:/path`` (regexp_table(5)); case-insensitive unless the ``i`` flag is given."""

    def _load(self) -> RegexpRules:
        return parse_regexp(self.path)

    def lookup(self, key: str) -> str | None:  # no case folding: the pattern flags decide
        return match_regexp(self._current(), key)


class PcreTable(RegexpTable):
    """``pcre:/path`` (pcre_table(5)): regexp's syntax with PCRE's flags and defaults."""

    def _load(self) -> RegexpRules:
        return parse_regexp(self.path, pcre=True)


class PasswdTable(Table):
    """``unix:passwd.byname``: the system's user database (value: the home directory).
    Every lookup may ask NSS (files, LDAP, sssd, ...), so it may block."""

    def __init__(self, ref: str) -> None:
        self.ref = ref

    def may_block(self) -> bool:
        return True

    def lookup(self, key: str) -> str | None:
        import pwd

        try:
            return pwd.getpwnam(key.lower()).pw_dir
        except (KeyError, ValueError):
            return None
        except OSError as exc:
            raise TableError(f"{self.ref}: {exc.strerror or exc}") from None


def open_table(ref: str, *, lazy: bool = False) -> Table:
    """The table *ref* names.  File tables are read at once (a TableError names the
    problem) unless *lazy*, when nothing is read until the first lookup."""
    kind, sep, name = ref.partition(":")
    if not sep or not name:
        raise TableError(f"bad lookup table reference {ref!r} (use type:name)")
    if kind == "proxy":  # Postfix's proxymap: the same table, read directly here
        return open_table(name, lazy=lazy)
    if kind == "unix":
        if name != "passwd.byname":
            raise TableError(f"{ref}: only unix:passwd.byname is supported")
        return PasswdTable(ref)
    if kind == "inline":
        return InlineTable(ref, name)
    if kind == "static":
        return StaticTable(ref, name)
    files: dict[str, type[_FileTable[Any]]] = {"texthash": TextHashTable, "hash": HashTable, "btree": HashTable,
                                                "cidr": CidrTable, "regexp": RegexpTable, "pcre": PcreTable}
    if kind in files:
        return files[kind](ref, Path(name), lazy=lazy)
    raise TableError(f"{ref}: unsupported lookup table type {kind!r}")


def lookup_first(tables: Sequence[Table], key: str) -> str | None:
    for table in tables:
        value = table.lookup(key)
        if value is not None:
            return value
    return None


_lookup_limiter = thread_pool("trimail_table_lookups", LOOKUP_THREADS)


async def off_loop(tables: Sequence[Table], fn: Callable[..., T], *args: Any,
                   timeout: float = DEFAULT_LOOKUP_TIMEOUT) -> T:
    """``fn(*args)``, which looks things up in *tables*: called right here when no
    table may block, else on a lookup thread; a ``TableError`` when the answer does
    not come within *timeout* seconds (the thread is abandoned, still counted
    against ``LOOKUP_THREADS`` until it returns)."""
    if not any(table.may_block() for table in tables):
        return fn(*args)
    import trio  # (not at the top: sendmail looks tables up without trio, whose import costs it 80 ms)

    with trio.move_on_after(timeout):
        return await trio.to_thread.run_sync(functools.partial(fn, *args), limiter=_lookup_limiter(),
                                             abandon_on_cancel=True)
    names = ", ".join(table.ref for table in tables)
    raise TableError(f"{names}: no answer within {timeout:g}s (table_lookup_timeout)")


def _unbrace(text: str) -> str:
    return text[1:-1].strip() if text.startswith("{") and text.endswith("}") else text
