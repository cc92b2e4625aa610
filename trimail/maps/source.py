"""Table source files (postmap(1) and aliases(5) syntax) and their compiled form.

``logical_lines`` reads a source file as entries (comment and blank lines
dropped, continuation lines joined); ``parse_source`` splits postmap(1) entries
into ``key whitespace value``; ``compile_table`` writes entries as ``FILE.db``, an
indexed SQLite table, through a temporary file that is fsynced and renamed over
the old one, so a reader sees the old table or the new one, never a mixture.

Security notes: source files are read as text (at most what the file holds, as
UTF-8) and never executed; the compiled file gets the source file's permission
bits (without execute) and is written next to it, never through a symlink
(``mkstemp`` creates it, its mode is set on that descriptor, and SQLite opens it
with ``SQLITE_OPEN_NOFOLLOW``).  Run by root, compiling a source file another user
owns happens with that user's ids, as Postfix's postmap and postalias do: the
owner of the directory could otherwise swap the temporary file for a symlink and
have root's chmod or SQLite change any file (red team 33b: /etc/shadow made 0666).
Every library error (apsw, OS) becomes a ``TableError`` naming the file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import apsw

from trimail.errors import LookupFailure


class TableError(LookupFailure):
    """A table that cannot be opened, parsed or read; names the file and line.
    A lookup that meets one fails temporarily (4.3.0): the mail waits, never bounces."""


def compiled_path(source: Path) -> Path:
    return source.with_name(source.name + ".db")


def logical_lines(path: Path) -> Iterator[tuple[int, str]]:
    """A table source file's entries as (first line number, text): comment and blank
    lines dropped, lines starting with white space appended to the entry before as
    they are (only the newline goes: ``go away`` and ``  (continued)`` make ``go away
    (continued)`` with both spaces, as Postfix's readllines joins them), trailing
    white space removed."""
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
            entry = (entry[0], entry[1] + line)  # verbatim, white space and all, as Postfix's readllines
            continue
        if entry is not None:
            yield entry[0], entry[1].rstrip()
        entry = (number, line)
    if entry is not None:
        yield entry[0], entry[1].rstrip()


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
    keys wins, with a warning naming both lines.  Root does it as the source's owner."""
    try:
        owner = source.stat()
    except OSError as exc:
        raise TableError(f"{source}: {exc.strerror}") from None
    with _as_user(owner.st_uid, owner.st_gid):
        return _compile(source, entries)


@contextlib.contextmanager
def _as_user(uid: int, gid: int) -> Iterator[None]:
    """Root's effective ids become *uid*:*gid* (no supplementary groups) for the block;
    anybody else's, and root's own files, stay as they are."""
    if os.geteuid() != 0 or uid == 0:
        yield
        return
    groups, egid = os.getgroups(), os.getegid()
    os.setgroups([])
    os.setegid(gid)
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(egid)
        os.setgroups(groups)


@contextlib.contextmanager
def private_directory(parent: Path) -> Iterator[Path]:
    """A new directory in *parent* only this process's user may enter (0700),
    removed with what is left in it afterwards: where a file is written before it is
    renamed into *parent*, with SQLite's side files (-journal, -wal) beside it.  In a
    sticky directory (/tmp) nobody else may create files next to the temporary one:
    a user planted a -wal there and SQLite wrote it into a backup (red team 33d)."""
    made = Path(tempfile.mkdtemp(prefix=".trimail-", dir=parent))
    try:
        yield made
    finally:
        shutil.rmtree(made, ignore_errors=True)


def replaceable_by_others(directory: Path) -> bool:
    """May a user other than this process's and root rename or replace what this
    process writes in *directory* (it is theirs, or others may write it and it is not
    sticky)?  Then a file made there could be swapped before it is written, whatever
    O_EXCL and O_NOFOLLOW say (red team 33c: a queue backup read by a user)."""
    st = directory.stat()
    others_write = st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX
    return st.st_uid not in (0, os.geteuid()) or bool(others_write)


def _compile(source: Path, entries: Iterable[tuple[str, str, int]]) -> tuple[int, list[str]]:
    target = compiled_path(source)
    try:
        if os.geteuid() == 0 and replaceable_by_others(target.parent):  # (a user's own table: their ids by now)
            raise TableError(f"{target}: another user may replace files in {target.parent}: not written as root")
    except OSError as exc:
        raise TableError(f"{target.parent}: {exc.strerror}") from None
    _check_replaceable(target)
    warnings: list[str] = []
    seen: dict[str, int] = {}
    rows = []
    for key, value, number in entries:
        if key in seen:
            warnings.append(f"{source}:{number}: duplicate entry: {key!r} (first at line {seen[key]})")
            continue
        seen[key] = number
        rows.append((key, value))
    try:
        with private_directory(target.parent) as private:
            return _write(source, target, private, rows, warnings)
    except OSError as exc:
        raise TableError(f"{target}: cannot create a temporary file: {exc.strerror}") from None


def _write(source: Path, target: Path, private: Path, rows: list[tuple[str, str]],
           warnings: list[str]) -> tuple[int, list[str]]:
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=private)
    try:
        try:
            os.fchmod(fd, source.stat().st_mode & 0o666)  # (the file mkstemp made, whatever its name is now)
        finally:
            os.close(fd)
        db = apsw.Connection(tmp, flags=apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_NOFOLLOW)
        db.execute("PRAGMA journal_mode = DELETE")
        with db:
            db.execute("CREATE TABLE map (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID")
            db.executemany("INSERT INTO map (key, value) VALUES (?, ?)", rows)
        db.close()
        fsync_path(tmp)
        os.replace(tmp, target)
    except (OSError, apsw.Error) as exc:
        _discard(tmp)
        raise TableError(f"{target}: cannot write: {getattr(exc, 'strerror', None) or exc}") from None
    except BaseException:
        _discard(tmp)
        raise
    return len(rows), warnings


def _check_replaceable(target: Path) -> None:
    """Refuse to rename a table over anything that is not an older table: a device,
    a directory, or an SQLite database with other tables (``postmap
    hash:/var/spool/trimail/queue`` would otherwise replace the live queue).  A
    regular file that is not SQLite (Postfix's Berkeley DB) may be replaced."""
    try:
        mode = target.lstat().st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise TableError(f"{target}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise TableError(f"{target}: exists and is not a regular file; refusing to replace it")
    try:
        db = apsw.Connection(str(target), flags=apsw.SQLITE_OPEN_READONLY)
        try:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            db.close()
    except apsw.Error:
        return  # not SQLite: an old Berkeley DB file, say
    if tables - {"map"}:
        raise TableError(f"{target}: is an SQLite database but not a trimail table "
                         f"(it has {', '.join(sorted(tables))}); refusing to replace it")


def _discard(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


def fsync_path(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
