"""aliases(5): the source format, postalias/newaliases, and recursive expansion.

Source syntax: ``name: value, value, ...``; a line starting with white space
continues the previous entry; ``#`` starts a comment line; a name may be quoted
(``"a name": ...``).  Values are local names, addresses, ``:include:/path`` (one
or more addresses per line, comments allowed), ``/path`` (append to a file, mbox
format) and ``|command``.  ``postalias FILE`` compiles the file into ``FILE.db``
(the same indexed SQLite table as ``postmap``, atomically); serve reads the
compiled table and notices a new one by itself.

Expansion (what local(8) does): names are looked up case-insensitively, with the
``recipient_delimiter`` extension removed as a second try; a name that expands to
itself is delivered to its own mailbox; an alias that comes back to one already
being expanded is a loop and bounces; duplicates are delivered once; depth and
size are bounded.  ``owner-<alias>`` becomes the envelope sender of the mail an
alias list fans out, when that alias exists.

Security notes: ``:include:`` and ``/file`` targets must be absolute paths without
``..``; ``|command`` targets are only produced when ``allow_mail_to_commands``
names ``alias`` (or ``include`` for include files).  Nothing here runs anything.
Each target records where it came from (``source``: alias or include) and whose
rights it is delivered with (``uid``: None for a root-owned alias table, i.e.
``default_privs``; the owner of an alias table file that root does not own;
the owner of the ``:include:`` file - Postfix local(8), see
trimail.delivery.local.identity).  An include file is opened without
blocking and checked on its descriptor (Postfix's include.c): not a regular
file, or world writable, and the recipient bounces (5.3.5, "mail system
configuration error", the reason in the log); group writable (a group member
could add targets that run with the owner's rights), and its ``/file`` and
``|command`` targets are refused (``Target.refused``) while its addresses still
get the mail.  An include file is read with the rights of the delivery it
belongs to, as Postfix's include.c opens it with ``open_as()``: ``default_privs``
for root's alias table, the owner of a user's alias table, the first include
file's owner below it.  serve (``mail_owner``) and the root helper cannot switch
rights for one read in a threaded process, so they open the file and then check
on the descriptor that the file's mode lets that user read it (owner, primary
group, other), deferring 4.3.0 "Permission denied" otherwise; so a user who
replaces their include file by a link to a file only ``mail_owner`` or root may
read (the queue, /etc/shadow) learns nothing from the bounce.  Directories on
the way are not checked (a world-readable file in a directory the user cannot
search is still read).  Error texts name the include file, never its content's
lines beyond the one bad target.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pwd
import re
import stat
from pathlib import Path

from trimail import rewrite
from trimail.maps import Table, TableError, compile_table, logical_lines

MAX_DEPTH = 20
MAX_TARGETS = 1000
MAX_INCLUDE_BYTES = 1 << 20

log = logging.getLogger("trimail.local")


class AliasError(Exception):
    """Expansion failed for good (loop, depth, size, bad target): the mail bounces."""

    def __init__(self, dsn: str, text: str) -> None:
        super().__init__(text)
        self.dsn = dsn
        self.text = text


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    kind: str  # "mailbox" (local user), "remote" (address), "file", "command"
    value: str  # user name, address, path or command line
    owner: str | None = None  # owner-<alias> sender for list mail
    source: str = "alias"  # "alias" (the alias table) or "include" (an :include: file)
    uid: int | None = None  # whose rights /file and |command use: None = default_privs
    refused: str = ""  # why this /file or |command target must not be delivered (unsafe include file)
    via: str = ""  # the local name whose alias entry (or mailbox) this is: the log's to=<via@$myorigin>


def parse_alias_source(path: Path) -> list[tuple[str, str, int]]:
    """Entries of an aliases(5) file as (folded name, value, line number)."""
    return [_split_alias(path, number, text) for number, text in logical_lines(path)]


def _split_alias(path: Path, number: int, text: str) -> tuple[str, str, int]:
    m = re.match(r'\s*("(?:[^"\\]|\\.)*"|[^:\s]+)\s*:\s*(.*)$', text)
    if not m or not m.group(2).strip():
        raise TableError(f"{path}:{number}: expected format: name: value, ...")
    name = m.group(1)
    if name.startswith('"'):
        name = name[1:-1].replace('\\"', '"')
    return name.lower(), _normalized(m.group(2)), number


_QUOTED = re.compile(r'("(?:[^"\\]|\\.)*"?)')


def _normalized(value: str) -> str:
    """The value as postalias(1) stores it (its RFC 822 tokens written out again):
    white space outside quotes collapsed to one space, none before a comma and one
    after it; quoted strings kept as they are (``"|cmd  arg"``)."""
    parts = _QUOTED.split(value.strip())
    for i in range(0, len(parts), 2):  # the even parts are outside quotes
        parts[i] = re.sub(r"\s*,\s*", ", ", re.sub(r"\s+", " ", parts[i]))
    return "".join(parts).strip()


def postalias(source: Path) -> tuple[int, list[str]]:
    """Compile an aliases(5) file into ``source.db`` atomically; (entries, warnings)."""
    return compile_table(source, parse_alias_source(source))


def split_values(text: str) -> list[str]:
    """Comma-separated alias values; quotes protect commas (``"|cmd a, b"``)."""
    items, current, quoted = [], [], False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            items.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    items.append("".join(current).strip())
    return [_unquote(i) for i in items if i]


def _unquote(item: str) -> str:
    return item[1:-1] if len(item) >= 2 and item.startswith('"') and item.endswith('"') else item


def _safe_path(path: str, what: str) -> str:
    if not path.startswith("/") or "/../" in path + "/" or "\x00" in path:
        raise AliasError("5.3.5", f"bad {what} path {path!r}: must be absolute, without ..")
    return path


def table_owner(table: Table | None) -> int | None:
    """Whose rights an alias table's /file and |command targets get (Postfix's
    alias.c): None (default_privs) for a table root owns or one written in
    main.cf itself (inline:, static:); the owner of the file otherwise.  An
    owner that cannot be found defers (4.3.0), as in Postfix."""
    watched = getattr(table, "_watched", None)
    if watched is None:
        return None
    try:
        uid = os.stat(watched()).st_uid
    except OSError as exc:
        raise AliasError("4.3.0", f"mail system configuration error: no owner for alias table "
                                  f"{getattr(table, 'ref', '?')}: {exc.strerror}") from None
    return uid or None


class Expander:
    def __init__(self, tables: list[Table], settings: rewrite.Settings, delimiter: str = "",
                 commands_from: frozenset[str] = frozenset(), default_privs: str = "nobody") -> None:
        self.tables = tables
        self.default_privs = default_privs
        self.rewrite = settings
        self.delimiter = delimiter
        self.commands_from = commands_from

    def lookup(self, name: str) -> str | None:
        return self._lookup(name)[0]

    def _lookup(self, name: str) -> tuple[str | None, Table | None]:
        """The alias value of *name* and the table that has it."""
        keys = [name.lower()]
        if self.delimiter and self.delimiter in name:
            keys.append(name.split(self.delimiter, 1)[0].lower())
        for key in keys:
            for table in self.tables:
                value = table.lookup(key)
                if value is not None:
                    return value, table
        return None, None

    def expand(self, user: str) -> list[Target]:
        """Where mail for local name *user* goes; raises AliasError when it bounces."""
        targets: list[Target] = []
        seen: set[tuple[str, str]] = set()
        self._expand_name(user.lower(), (), targets, seen, None, None)
        return targets

    def _add(self, target: Target, targets: list[Target], seen: set[tuple[str, str]]) -> None:
        key = (target.kind, target.value.lower() if target.kind in ("mailbox", "remote") else target.value)
        if key in seen:
            return
        seen.add(key)
        targets.append(target)
        if len(targets) > MAX_TARGETS:
            raise AliasError("5.3.0", f"alias expansion has more than {MAX_TARGETS} targets")

    def _expand_name(self, name: str, path: tuple[str, ...], targets: list[Target],
                     seen: set[tuple[str, str]], owner: str | None, uid: int | None) -> None:
        if name in path:
            raise AliasError("5.4.6", f"alias loop: {' -> '.join((*path, name))}")
        if len(path) >= MAX_DEPTH:
            raise AliasError("5.4.6", f"alias expansion deeper than {MAX_DEPTH}: {' -> '.join(path)}")
        value, table = self._lookup(name)
        if value is None:
            self._add(Target("mailbox", name, owner, via=name), targets, seen)
            return
        list_owner = owner
        if self.lookup(f"owner-{name}") is not None:
            list_owner = f"owner-{name}"
        if uid is None:
            uid = table_owner(table)
        self._expand_values(split_values(value), (*path, name), targets, seen, list_owner, "alias", name, uid, "")

    def _expand_values(self, values: list[str], path: tuple[str, ...], targets: list[Target],
                       seen: set[tuple[str, str]], owner: str | None, source: str, self_name: str | None,
                       uid: int | None, refused: str) -> None:
        """*uid*: whose rights this list's /file and |command targets get (None:
        default_privs); *refused*: why they must not be delivered at all."""
        via = next((step for step in reversed(path) if not step.startswith(":include:")), "")
        for value in values:
            if value.lower().startswith(":include:"):
                include = _safe_path(value[9:].strip(), ":include:")
                if f":include:{include}" in path:
                    raise AliasError("5.4.6", f"alias loop: {include} includes itself")
                if len(path) >= MAX_DEPTH:
                    raise AliasError("5.4.6", f"alias expansion deeper than {MAX_DEPTH}")
                lines, file_uid, unsafe = self._read_include(include, uid)
                self._expand_values(lines, (*path, f":include:{include}"), targets, seen, owner, "include", None,
                                    uid if uid is not None else file_uid or None, refused or unsafe)
            elif value.startswith("|"):
                if source not in self.commands_from:
                    raise AliasError("5.7.1", f"mail to command is restricted by allow_mail_to_commands: {value}")
                self._add(Target("command", value[1:].strip(), owner, source, uid, refused, via), targets, seen)
            elif value.startswith("/"):
                self._add(Target("file", _safe_path(value, "file"), owner, source, uid, refused, via), targets, seen)
            else:
                self._expand_address(value, path, targets, seen, owner, self_name, via)

    def _expand_address(self, value: str, path: tuple[str, ...], targets: list[Target],
                        seen: set[tuple[str, str]], owner: str | None, self_name: str | None,
                        via: str = "") -> None:
        address = value.strip().strip("<>")
        resolved = rewrite.resolve(address, self.rewrite)  # the one resolver, as for mail from outside
        if resolved.klass == "invalid":
            raise AliasError("5.1.3", f"bad alias target {value!r}")
        if resolved.klass != "local":
            self._add(Target("remote", resolved.address, owner, via=via), targets, seen)
            return
        name = resolved.local.lower()
        if not re.fullmatch(r"[^\s@\x00-\x1f]+", name):
            raise AliasError("5.1.3", f"bad alias target {value!r}")
        if name == self_name:  # "user: user, ..." delivers to user's own mailbox
            self._add(Target("mailbox", name, owner, via=name), targets, seen)
        else:
            self._expand_name(name, path, targets, seen, owner, None)  # alias entries: the table's rights

    def _read_include(self, path: str, uid: int | None) -> tuple[list[str], int, str]:
        """The values of an include file, its owner, and why its /file and
        |command targets are refused ("" when they are not); AliasError when the
        file must not be used at all (Postfix's include.c checks, on the open
        descriptor so that the file checked is the file read)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as exc:
            raise AliasError("4.3.0", f"cannot open include file {path}: {exc.strerror}") from None
        with open(fd, "rb") as handle:
            st = os.fstat(fd)
            problem = ""
            if not stat.S_ISREG(st.st_mode):
                problem = "is not a regular file"
            elif st.st_mode & stat.S_IWOTH:
                problem = "is world writable"
            if problem:
                log.warning(":include: file %s %s", path, problem)
                raise AliasError("5.3.5", f"mail system configuration error: :include: file {problem}")
            reader = self._reader(uid)
            if not _readable(st, *reader):
                log.warning("cannot open include file %s: not readable by uid %d gid %d, whose rights read it",
                            path, *reader)
                raise AliasError("4.3.0", f"cannot open include file {path}: Permission denied")
            data = handle.read(MAX_INCLUDE_BYTES + 1)
        unsafe = ""
        if st.st_mode & stat.S_IWGRP:
            unsafe = f"mail to file or command from group-writable :include: file {path} is refused"
        if len(data) > MAX_INCLUDE_BYTES:
            raise AliasError("5.3.0", f"include file {path} is larger than {MAX_INCLUDE_BYTES} bytes")
        values = []
        for line in data.decode("utf-8", "replace").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                values += split_values(line)
        return values, st.st_uid, unsafe

    def _reader(self, uid: int | None) -> tuple[int, int]:
        """(uid, gid) whose rights read an include file: *uid*'s, or default_privs'."""
        try:
            entry = pwd.getpwnam(self.default_privs) if uid is None else pwd.getpwuid(uid)
        except KeyError:
            who = f"default_privs {self.default_privs!r}" if uid is None else f"uid {uid}"
            raise AliasError("4.3.5", f"mail system configuration error: {who} has no account") from None
        return entry.pw_uid, entry.pw_gid


def _readable(st: os.stat_result, uid: int, gid: int) -> bool:
    """Whether uid/gid (gid its only group, as Postfix's set_eugid) may read a file
    with *st*'s owner and mode: the kernel's check, owner bits first."""
    if uid == 0:
        return True
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IRUSR)
    if st.st_gid == gid:
        return bool(st.st_mode & stat.S_IRGRP)
    return bool(st.st_mode & stat.S_IROTH)
