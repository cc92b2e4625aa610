"""Lookup tables (``type:name``), one interface for every ``*_maps`` parameter.

``open_table("hash:/etc/trimail/transport")`` returns a ``Table`` whose
``lookup(key)`` gives the value or None.  Types so far:

- ``inline:{ key=value, key2=value2 }`` — the table is in the parameter itself.
- ``texthash:/path`` — the source file read directly (no compilation).
- ``hash:/path`` and ``btree:/path`` — ``/path.db``, an indexed SQLite database that
  ``trimail postmap /path`` compiles from the source file, atomically.
- ``static:value`` — every key maps to *value*.

Source syntax (postmap(1)): ``key whitespace value``; lines starting with white
space continue the previous entry; ``#`` starts a comment line; the first of
duplicate keys wins (with a warning).  Keys are folded to lower case, as Postfix
does for these table types.  File tables notice a changed file (checked at most
once a second) and reload without a restart.

Security notes: table files are read as text and never executed; the compiled
database is opened read-only.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import apsw

from trimail.config import split_list

RECHECK_SECONDS = 1.0


class TableError(Exception):
    """A table that cannot be opened or parsed; names the file and line."""


class Table:
    ref: str

    def lookup(self, key: str) -> str | None:
        raise NotImplementedError


class InlineTable(Table):
    def __init__(self, ref: str, body: str) -> None:
        self.ref = ref
        self.entries: dict[str, str] = {}
        text = body.strip()
        if not (text.startswith("{") and text.endswith("}")):
            raise TableError(f"{ref}: use inline:{{ key=value, ... }}")
        for item in split_list(text[1:-1]):
            key, sep, value = _unbrace(item).partition("=")
            if not sep or not key.strip():
                raise TableError(f"{ref}: bad entry {item!r} (use key=value)")
            self.entries.setdefault(key.strip().lower(), _unbrace(value.strip()))

    def lookup(self, key: str) -> str | None:
        return self.entries.get(key.lower())


class StaticTable(Table):
    def __init__(self, ref: str, value: str) -> None:
        self.ref = ref
        self.value = _unbrace(value.strip())

    def lookup(self, key: str) -> str | None:
        return self.value


class _FileTable(Table):
    """Base for tables backed by a file that may change under us."""

    def __init__(self, ref: str, path: Path) -> None:
        self.ref = ref
        self.path = path
        self._mtime: float | None = None
        self._checked = 0.0
        self._refresh(force=True)

    def _watched(self) -> Path:
        return self.path

    def _refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < RECHECK_SECONDS:
            return
        self._checked = now
        try:
            mtime = self._watched().stat().st_mtime_ns
        except OSError as exc:
            raise TableError(f"{self.ref}: cannot open {self._watched()}: {exc.strerror}") from None
        if mtime != self._mtime:
            self._load()
            self._mtime = mtime

    def _load(self) -> None:
        raise NotImplementedError

    def lookup(self, key: str) -> str | None:
        self._refresh()
        return self._get(key.lower())

    def _get(self, key: str) -> str | None:
        raise NotImplementedError


class TextHashTable(_FileTable):
    entries: dict[str, str]

    def _load(self) -> None:
        self.entries = {}
        for key, value, _ in parse_source(self.path):
            self.entries.setdefault(key, value)

    def _get(self, key: str) -> str | None:
        return self.entries.get(key)


class HashTable(_FileTable):
    """A compiled table: ``path.db`` (SQLite, one indexed key column)."""

    _db: apsw.Connection | None = None

    def _watched(self) -> Path:
        return compiled_path(self.path)

    def _load(self) -> None:
        if self._db is not None:
            self._db.close()
        db_path = compiled_path(self.path)
        try:
            self._db = apsw.Connection(f"file:{db_path}?mode=ro&immutable=1",
                                       flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
            self._db.execute("SELECT count(*) FROM map").fetchone()
        except apsw.Error as exc:
            raise TableError(f"{self.ref}: {db_path} is not a trimail table ({exc}); run trimail postmap") from None

    def _get(self, key: str) -> str | None:
        assert self._db is not None
        row = self._db.execute("SELECT value FROM map WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]


def compiled_path(source: Path) -> Path:
    return source.with_name(source.name + ".db")


def parse_source(path: Path) -> Iterator[tuple[str, str, int]]:
    """Entries of a postmap(1) source file as (folded key, value, line number)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TableError(f"{path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise TableError(f"{path}: not UTF-8 text: {exc.reason}") from None
    entry: tuple[int, str] | None = None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[0].isspace():
            if entry is None:
                raise TableError(f"{path}:{number}: continuation line without an entry before it")
            entry = (entry[0], entry[1] + " " + stripped)
            continue
        if entry is not None:
            yield _split_entry(path, *entry)
        entry = (number, stripped)
    if entry is not None:
        yield _split_entry(path, *entry)


def _split_entry(path: Path, number: int, text: str) -> tuple[str, str, int]:
    parts = text.split(None, 1)
    if len(parts) != 2:
        raise TableError(f"{path}:{number}: expected format: key whitespace value")
    return parts[0].lower(), parts[1].strip(), number


def postmap(source: Path) -> tuple[int, list[str]]:
    """Compile *source* into ``source.db`` atomically; return (entries, warnings)."""
    target = compiled_path(source)
    warnings: list[str] = []
    seen: dict[str, int] = {}
    rows = []
    for key, value, number in parse_source(source):
        if key in seen:
            warnings.append(f"{source}:{number}: duplicate entry: {key!r} (first at line {seen[key]})")
            continue
        seen[key] = number
        rows.append((key, value))
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        db = apsw.Connection(tmp)
        db.execute("PRAGMA journal_mode = DELETE")
        with db:
            db.execute("CREATE TABLE map (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID")
            db.executemany("INSERT INTO map (key, value) VALUES (?, ?)", rows)
        db.close()
        mode = source.stat().st_mode & 0o666
        os.chmod(tmp, mode)
        fsync_path(tmp)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return len(rows), warnings


def fsync_path(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PasswdTable(Table):
    """``unix:passwd.byname``: the system's user database (value: the home directory)."""

    def __init__(self, ref: str) -> None:
        self.ref = ref

    def lookup(self, key: str) -> str | None:
        import pwd

        try:
            return pwd.getpwnam(key.lower()).pw_dir
        except (KeyError, ValueError):
            return None


def open_table(ref: str) -> Table:
    kind, sep, name = ref.partition(":")
    if not sep or not name:
        raise TableError(f"bad lookup table reference {ref!r} (use type:name)")
    if kind == "proxy":  # Postfix's proxymap: the same table, read directly here
        return open_table(name)
    if kind == "unix":
        if name != "passwd.byname":
            raise TableError(f"{ref}: only unix:passwd.byname is supported")
        return PasswdTable(ref)
    if kind == "inline":
        return InlineTable(ref, name)
    if kind == "static":
        return StaticTable(ref, name)
    if kind == "texthash":
        return TextHashTable(ref, Path(name))
    if kind in ("hash", "btree"):
        return HashTable(ref, Path(name))
    raise TableError(f"{ref}: unsupported lookup table type {kind!r}")


def lookup_first(tables: list[Table], key: str) -> str | None:
    for table in tables:
        value = table.lookup(key)
        if value is not None:
            return value
    return None


def _unbrace(text: str) -> str:
    return text[1:-1].strip() if text.startswith("{") and text.endswith("}") else text
