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

import ipaddress
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import apsw

from trimail.config import split_list
from trimail.errors import LookupFailure

RECHECK_SECONDS = 1.0


class TableError(LookupFailure):
    """A table that cannot be opened, parsed or read; names the file and line.
    A lookup that meets one fails temporarily (4.3.0): the mail waits, never bounces."""


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


def logical_lines(path: Path) -> Iterator[tuple[int, str]]:
    """A table source file's entries as (first line number, text): comment and blank
    lines dropped, lines starting with white space joined to the entry before."""
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
            yield entry
        entry = (number, stripped)
    if entry is not None:
        yield entry


def parse_source(path: Path) -> Iterator[tuple[str, str, int]]:
    """Entries of a postmap(1) source file as (folded key, value, line number)."""
    for number, text in logical_lines(path):
        yield _split_entry(path, number, text)


def _split_entry(path: Path, number: int, text: str) -> tuple[str, str, int]:
    parts = text.split(None, 1)
    if len(parts) != 2:
        raise TableError(f"{path}:{number}: expected format: key whitespace value")
    return parts[0].lower(), parts[1].strip(), number


def postmap(source: Path) -> tuple[int, list[str]]:
    """Compile a postmap(1) source into ``source.db`` atomically; (entries, warnings)."""
    return compile_table(source, parse_source(source))


def compile_table(source: Path, entries: Iterable[tuple[str, str, int]]) -> tuple[int, list[str]]:
    """Write (key, value, line) entries as ``source.db`` (an indexed SQLite table):
    to a temporary file, fsynced, renamed over the old one.  The first of duplicate
    keys wins, with a warning naming both lines."""
    target = compiled_path(source)
    warnings: list[str] = []
    seen: dict[str, int] = {}
    rows = []
    for key, value, number in entries:
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
        os.chmod(tmp, source.stat().st_mode & 0o666)
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


class CidrTable(_FileTable):
    """``cidr:/path`` (cidr_table(5)): ``network/prefix result`` lines, first match wins."""

    rules: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str]]

    def _load(self) -> None:
        self.rules = []
        for number, line in logical_lines(self.path):
            spec, _, result = line.partition(" ")
            spec = spec.strip()
            if spec.startswith("!"):
                raise TableError(f"{self.path}:{number}: negated cidr patterns are not supported")
            try:
                network = ipaddress.ip_network(spec.strip("[]") if "/" not in spec else
                                               spec.replace("[", "").replace("]", ""), strict=False)
            except ValueError:
                raise TableError(f"{self.path}:{number}: bad network {spec!r}") from None
            if not result.strip():
                raise TableError(f"{self.path}:{number}: no result for {spec}")
            self.rules.append((network, result.strip()))

    def _get(self, key: str) -> str | None:
        try:
            address = ipaddress.ip_address(key.strip("[]"))
        except ValueError:
            return None
        for network, result in self.rules:
            if address.version == network.version and address in network:
                return result
        return None


class RegexpTable(_FileTable):
    """``regexp:/path`` (regexp_table(5)): ``/pattern/flags result``, ``!/pattern/``,
    ``if /pattern/`` ... ``endif``; case-insensitive unless the ``i`` flag is given."""

    rules: list[tuple[list[tuple[re.Pattern[str], bool]], str]]

    def _load(self) -> None:
        self.rules = []
        conditions: list[tuple[re.Pattern[str], bool]] = []
        stack: list[int] = []
        for number, line in logical_lines(self.path):
            if line.lower() == "endif":
                if not stack:
                    raise TableError(f"{self.path}:{number}: endif without if")
                del conditions[stack.pop():]
                continue
            is_if = line.lower().startswith("if ") or line.lower().startswith("if\t")
            body = line[3:].strip() if is_if else line
            pattern, negated, rest = _parse_regexp(self.path, number, body)
            if is_if:
                stack.append(len(conditions))
                conditions.append((pattern, negated))
                continue
            if not rest:
                raise TableError(f"{self.path}:{number}: no result after the pattern")
            self.rules.append(([*conditions, (pattern, negated)], rest))
        if stack:
            raise TableError(f"{self.path}: if without endif")

    def lookup(self, key: str) -> str | None:  # no case folding: the pattern flags decide
        self._refresh()
        for conditions, result in self.rules:
            matches = []
            ok = True
            for pattern, negated in conditions:
                m = pattern.search(key)
                if bool(m) == negated:
                    ok = False
                    break
                matches.append(m)
            if ok:
                last = matches[-1] if matches else None
                if last is not None:
                    return re.sub(r"\$(\d)|\$\{(\d)\}",
                                  lambda g: last.group(int(g.group(1) or g.group(2))) or "", result)
                return result
        return None


def _parse_regexp(path: Path, number: int, text: str) -> tuple[re.Pattern[str], bool, str]:
    negated = text.startswith("!")
    if negated:
        text = text[1:]
    if not text or text[0] not in "/":
        raise TableError(f"{path}:{number}: expected /pattern/flags")
    end = 1
    while end < len(text):
        if text[end] == "\\":
            end += 2
            continue
        if text[end] == "/":
            break
        end += 1
    if end >= len(text):
        raise TableError(f"{path}:{number}: unterminated pattern")
    pattern, rest = text[1:end], text[end + 1:]
    flags_text, _, result = rest.partition(" ")
    if not re.fullmatch(r"[imx]*", flags_text):
        result, flags_text = rest, ""
    flags = re.IGNORECASE
    if "i" in flags_text:
        flags = 0  # Postfix: the i flag toggles case sensitivity on
    if "m" in flags_text:
        flags |= re.MULTILINE
    if "x" in flags_text:
        flags |= re.VERBOSE
    try:
        return re.compile(pattern, flags), negated, result.strip()
    except re.error as exc:
        raise TableError(f"{path}:{number}: bad regular expression: {exc}") from None


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
    if kind == "cidr":
        return CidrTable(ref, Path(name))
    if kind in ("regexp", "pcre"):
        return RegexpTable(ref, Path(name))
    raise TableError(f"{ref}: unsupported lookup table type {kind!r}")


def lookup_first(tables: list[Table], key: str) -> str | None:
    for table in tables:
        value = table.lookup(key)
        if value is not None:
            return value
    return None


def _unbrace(text: str) -> str:
    return text[1:-1].strip() if text.startswith("{") and text.endswith("}") else text
