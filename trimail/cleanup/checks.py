"""header_checks and body_checks, as Postfix's cleanup(8) applies them (header_checks(5)):
each logical header (its folded lines joined with a newline) is looked up in
``header_checks`` when it is a primary header, in ``mime_header_checks`` when it is a
MIME header (``Content-*``, ``MIME-Version``) or a header of a multipart part, in
``nested_header_checks`` when it is a header of an attached message (message/rfc822);
every other line of the body (preamble, boundary lines, part contents) in
``body_checks`` (a line longer than ``line_length_limit`` piece by piece), up to
``body_checks_size_limit`` bytes of each part.  A header longer than
``header_size_limit`` (a part's or an attached message's: the primary header
section is refused whole at that size) is looked up by its first
``header_size_limit`` bytes, as Postfix's MIME parser keeps no more of it; the rest
of its lines is passed on (dropped with it by IGNORE and REPLACE), never held in
memory.  The first table
that answers decides; its answer is an action:

REJECT [text], WARN [text], INFO [text], HOLD [text], DISCARD [text], IGNORE,
STRIP [text], PASS [text], PREPEND text, REPLACE text, REDIRECT address, BCC address,
FILTER transport:nexthop, DUNNO, OK.

After REJECT, DISCARD or PASS nothing more is looked up (Postfix clears its filter
flags); after PASS no milter sees the message either (``Outcome.passed``).  STRIP is
IGNORE with a log line.
REJECT's text may start with an enhanced status code (default ``5.7.1``; a ``4.x.x``
code makes it a ``451`` deferral); without text it is ``5.7.1 message content
rejected``.  An unknown action is logged as a warning and changes nothing.

``ContentChecks.scan`` is pure: lines in, lines out (through *out*), the actions to
log through *note*, the outcome returned.  Table errors (``TableError``) propagate.
``ContentChecks.lines`` cuts a message's chunks into the lines it takes
(trimail/cleanup/lines.py), and ``log_actions``
(``action_lines``) writes the noted actions as cleanup's log lines, for both callers: SMTP mail
(trimail/receive/checks.py) and local submissions (trimail/cleanup/inspection.py).

Parameters: header_checks, mime_header_checks, nested_header_checks, body_checks,
body_checks_size_limit, line_length_limit, header_size_limit.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import partial

from trimail.cleanup.lines import message_lines
from trimail.config import Config
from trimail.log import printable
from trimail.maps import Table, lookup_first, open_table

log = logging.getLogger("trimail.cleanup")

HEADER_NAME = re.compile(rb"^[!-9;-~]+[ \t]*:")
MIME_HEADER = re.compile(r"^(content-|mime-version[ \t]*:)", re.IGNORECASE)
DSN = re.compile(r"^([245])\.\d{1,3}\.\d{1,3}(?:\s+|$)")
BOUNDARY = re.compile(r'boundary[ \t]*=[ \t]*(?:"([^"]*)"|([^\s;]+))', re.IGNORECASE)
NESTING_LIMIT = 100  # mime_nesting_limit
REPLY_TEXT_LIMIT = 400  # characters of a REJECT text: its reply stays within SMTP's 512-octet line
NOTE_TEXT_LIMIT = 1000  # characters of an action's text in its log line
PIECE = 1 << 16  # about the bytes of a long line the scan takes at a time


@dataclass
class Outcome:
    reject: str | None = None  # "5.7.1 text" (or "4.x.x text": defer)
    hold: bool = False
    discard: bool = False
    redirect: str | None = None
    bcc: list[str] = field(default_factory=list)  # every BCC, in order (Postfix's cleanup keeps them all)
    filter: str | None = None
    edited: bool = False
    passed: bool = False  # PASS: no further checks, and no milter inspection of this message


Note = Callable[[str, str, str, str], None]  # (action, "header"|"body", the line, text)


@dataclass
class _Part:
    boundary: bytes | None = None  # the boundary of this multipart body
    body_bytes: int = 0  # body bytes of the current part inspected so far


CHECK_PARAMS = ("header_checks", "mime_header_checks", "nested_header_checks", "body_checks")


class ContentChecks:
    def __init__(self, header: Sequence[Table], mime: Sequence[Table], nested: Sequence[Table],
                 body: Sequence[Table], body_limit: int = 51200, line_limit: int = 2048,
                 header_limit: int = 102400) -> None:
        self.header, self.mime, self.nested, self.body = header, mime, nested, body
        self.body_limit, self.line_limit = body_limit, max(line_limit, 1)
        self.header_limit = max(header_limit, 1)

    def active(self) -> bool:
        return bool(self.header or self.mime or self.nested or self.body)

    def scan(self, lines: Iterable[bytes], out: Callable[[bytes], None], note: Note,
             turn: AbstractContextManager = nullcontext()) -> Outcome:
        """Each CRLF-ended line of the message (its first the ``Received:`` header this
        MTA added), the kept and edited lines written to *out*.  A long line may come in
        pieces, as ``lines`` cuts it: a piece without an LF is followed by more of its line.
        Each lookup is made holding *turn* (scans on threads take turns: see
        trimail/receive/checks.py)."""
        return _Scan(self, out, note, turn).run(lines)

    def lines(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """The lines of a message's *chunks* for ``scan``, a long line in pieces of a
        multiple of line_length_limit (about 64 KiB), so that it is looked up at the
        same places as whole and never held whole (red team 38: one 40 MB line took
        163 MB, four scans of them 750 MB)."""
        return message_lines(chunks, self.line_limit * max(1, PIECE // self.line_limit))


def content_checks(config: Config) -> ContentChecks | None:
    """The four tables of *config* (opened lazily), or None when every list is empty."""
    tables = [[open_table(ref, lazy=True) for ref in config.get(name)] for name in CHECK_PARAMS]
    checks = ContentChecks(*tables, body_limit=config.body_checks_size_limit, line_limit=config.line_length_limit,
                           header_limit=config.header_size_limit)
    return checks if checks.active() else None


def log_actions(queue_id: str, notes: Iterable[tuple[str, str, str, str]], *, origin: str, sender: str,
                recipients: Sequence[str], proto: str | None = None, helo: str = "") -> None:
    """The actions *scan* noted, written to the mail log (``action_lines``)."""
    log_lines(action_lines(queue_id, notes, origin=origin, sender=sender, recipients=recipients, proto=proto,
                           helo=helo))


def log_lines(lines: Iterable[tuple[int, str]]) -> None:
    """(level, text) lines of ``action_lines``, written as cleanup's."""
    for level, text in lines:
        log.log(level, "%s", text)


def action_lines(queue_id: str, notes: Iterable[tuple[str, str, str, str]], *, origin: str, sender: str,
                 recipients: Sequence[str], proto: str | None = None, helo: str = "") -> list[tuple[int, str]]:
    """(level, text) of each action *scan* noted, as cleanup_act_log writes them (``ID:
    reject: header Subject: ... from ORIGIN; from=<...> to=<...> proto=... helo=<...>:
    text``; no proto and helo when *proto* is None); a note without a class is a warning."""
    to = f" to=<{recipients[0]}>" if recipients else ""
    session = f" proto={proto} helo=<{helo}>" if proto is not None else ""
    lines = []
    for action, what, text, arg in notes:
        if not what:
            lines.append((logging.WARNING, printable(text, NOTE_TEXT_LIMIT)))
        else:
            lines.append((logging.INFO, f"{queue_id}: {action}: {what} {printable(text, 200).removesuffix('...')} "
                                        f"from {origin}; from=<{sender}>{to}{session}{f': {arg}' if arg else ''}"))
    return lines


class _Scan:
    def __init__(self, checks: ContentChecks, out: Callable[[bytes], None], note: Note,
                 turn: AbstractContextManager) -> None:
        self.checks, self.out, self.turn = checks, out, turn
        # an action's text may hold the line's own ($1: a folded header's newline, ESC):
        # logged as Postfix's msg functions log it, each control character a "?" (red team 37)
        self.note: Note = lambda action, what, text, arg: note(action, what, text, printable(arg, NOTE_TEXT_LIMIT))
        self.outcome = Outcome()
        self.stack: list[_Part] = []  # enclosing multipart bodies
        self.top = _Part()  # the body outside any multipart
        self.in_header = True
        self.header_class = "primary"  # primary | multipart | nested
        self.pending: list[bytes] = []  # the logical header being collected
        self.pending_size = 0
        self.overflow: bool | None = None  # a header past header_limit: are its further lines kept?
        self.content_type = ""  # of the header section being read
        self.checking = True
        self.rest_of: Callable[[bytes], None] | None = None  # takes the next piece of a line not ended
        self.line_kept = True  # did the last body piece looked up stay (not REPLACEd or IGNOREd)?

    def run(self, lines: Iterable[bytes]) -> Outcome:
        for line in lines:
            if self.rest_of is not None:
                self.rest_of(line)
            elif self.in_header:
                self._header_line(line)
            else:
                self._body_line(line)
            if line.endswith(b"\n"):
                self.rest_of = None
        self._flush_header()
        return self.outcome

    # -- headers ---------------------------------------------------------------------------
    def _header_line(self, line: bytes) -> None:
        if line[:1] in (b" ", b"\t") and (self.overflow is not None or self.pending):
            self._more_header(line)
            return
        self._flush_header()
        self.overflow = None
        if HEADER_NAME.match(line):
            self.pending, self.pending_size = [line], len(line)
            self.rest_of = self._more_header
            return
        self._end_of_header()
        if line in (b"\r\n", b"\n"):
            self.out(line)
        else:  # not a header: the body begins here
            self._body_line(line)

    def _more_header(self, line: bytes) -> None:
        """A folded line of the header being read, or a piece of one of its lines."""
        self.rest_of = self._more_header
        if self.overflow is not None:
            if self.overflow:
                self.out(line)
            return
        self.pending.append(line)
        self.pending_size += len(line)
        if self.pending_size > self.checks.header_limit:
            self._flush_header()  # looked up now, by what it has so far

    def _flush_header(self) -> None:
        if not self.pending:
            return
        lines, self.pending = self.pending, []
        original = b"".join(lines)
        overflowed = self.pending_size > self.checks.header_limit
        key = original[:self.checks.header_limit]
        logical = key.decode("utf-8", "replace").rstrip("\r\n").replace("\r\n", "\n")
        if MIME_HEADER.match(logical) and logical[:13].lower().startswith("content-type"):
            self.content_type = logical
        klass = self.header_class
        if MIME_HEADER.match(logical) or klass == "multipart":
            tables, param = self.checks.mime, "mime_header_checks"
        elif klass == "nested":
            tables, param = self.checks.nested, "nested_header_checks"
        else:
            tables, param = self.checks.header, "header_checks"
        kept = self._act(tables, param, "header", logical, original)
        if kept is None:
            self.out(original)
        elif kept:
            self.out(kept)
        if overflowed:
            self.overflow = kept is None or kept.endswith(original)  # kept, or PREPEND

    def _end_of_header(self) -> None:
        """The header section just read is over: what its Content-Type says comes next."""
        self.in_header = False
        value = self.content_type.partition(":")[2].strip()
        kind = value.lower()
        self.content_type = ""
        if kind.startswith("multipart/") and len(self.stack) < NESTING_LIMIT:
            m = BOUNDARY.search(value)  # a boundary is case-sensitive (RFC 2046): "--BB" is not "--bb"
            if m:
                self.stack.append(_Part((m.group(1) or m.group(2) or "").encode("utf-8", "replace")))
                return
        if kind.startswith("message/rfc822") and len(self.stack) < NESTING_LIMIT:
            self.in_header, self.header_class = True, "nested"

    # -- body --------------------------------------------------------------------------------
    def _body_line(self, line: bytes) -> None:
        self.rest_of = self._more_body
        stripped = line.rstrip(b"\r\n")
        if stripped.startswith(b"--"):
            for depth in range(len(self.stack) - 1, -1, -1):
                boundary = self.stack[depth].boundary
                if boundary and stripped[2:].rstrip(b" \t").startswith(boundary):
                    del self.stack[depth + 1:]
                    closing = stripped[2 + len(boundary):].startswith(b"--")
                    part = self.stack[depth]
                    self._check_body(line, stripped)
                    if not line.endswith(b"\n"):  # its other pieces count where the line began
                        self.rest_of = partial(self._more_body, part=_Part(None, part.body_bytes))
                    part.body_bytes = 0
                    if closing:
                        part.boundary = None
                    else:
                        self.in_header, self.header_class = True, "multipart"
                    return
        self._check_body(line, stripped)

    def _more_body(self, piece: bytes, part: _Part | None = None) -> None:
        """A piece of a body line after its first: it starts at a multiple of
        line_length_limit, so its lookups are the ones of the whole line; its line's end
        alone is no piece to look up."""
        part = part or (self.stack[-1] if self.stack else self.top)
        stripped = piece.rstrip(b"\r\n")
        if stripped:
            self._check_body(piece, stripped, part)
        else:  # the line's end goes where the piece before it went (REPLACE, IGNORE: with it)
            part.body_bytes += len(piece)
            if self.line_kept:
                self.out(piece)

    def _check_body(self, line: bytes, stripped: bytes, part: _Part | None = None) -> None:
        """A line longer than line_length_limit is looked up piece by piece, as Postfix's
        smtpd stores it as records of that length (the pieces stay one line).  Only the
        pieces that start within body_checks_size_limit are looked up; the rest of the
        line goes out as it is, in one piece, and so does a line past the limit (red
        team 38: a 40 MB line was cut into 20,000 pieces, each decoded, to look none of
        them up; 10 MB of short lines past the limit: 0.16 -> 0.11-0.14 s)."""
        part = part or (self.stack[-1] if self.stack else self.top)
        room = self.checks.body_limit - part.body_bytes
        self.line_kept = True
        if room <= 0 or not self.checking or not self.checks.body:  # nothing to look up
            part.body_bytes += len(line)
            self.out(line)
            return
        limit = self.checks.line_limit
        if len(stripped) <= limit:
            pieces, rest = [line], b""
        else:
            cut = min(len(stripped), -(-room // limit) * limit)  # the pieces that start within the limit
            pieces = [stripped[i:i + limit] for i in range(0, cut, limit)]
            if cut == len(stripped):
                pieces[-1] += line[len(stripped):]
                rest = b""
            else:
                rest = line[cut:]
        for piece in pieces:
            tables = self.checks.body if part.body_bytes < self.checks.body_limit else []
            part.body_bytes += len(piece)
            kept = self._act(tables, "body_checks", "body", piece.rstrip(b"\r\n").decode("utf-8", "replace"), piece)
            if kept is None:
                self.out(piece)
            elif kept:
                self.out(kept)
            self.line_kept = kept is None or kept.endswith(piece)  # kept, or PREPEND
        if rest:
            part.body_bytes += len(rest)
            self.out(rest)
            self.line_kept = True

    # -- actions ------------------------------------------------------------------------------
    def _act(self, tables: Sequence[Table], param: str, what: str, text: str, original: bytes) -> bytes | None:
        """None: keep the line; b"": drop it; else the line(s) that take its place."""
        if not self.checking or not tables:
            return None
        with self.turn:
            value = lookup_first(tables, text)
        if value is None:
            return None
        command, _, arg = value.strip().partition(" ")
        command, arg = command.upper(), arg.strip()
        outcome = self.outcome
        if command == "REJECT":
            reason = arg if DSN.match(arg) else f"5.7.1 {arg}" if arg else "5.7.1 message content rejected"
            if reason[0] not in "45":
                reason = "4" + reason[1:]
            reason = printable(reason, REPLY_TEXT_LIMIT)  # a reply line: no CR or LF from the line ($1)
            outcome.reject, self.checking = reason, False
            self.note("reject", what, text, reason)
            return b""
        if command in ("WARN", "INFO"):
            self.note("warning" if command == "WARN" else "info", what, text, arg)
        elif command == "HOLD":
            outcome.hold = True
            self.note("hold", what, text, arg)
        elif command == "DISCARD":
            outcome.discard, self.checking = True, False
            self.note("discard", what, text, arg)
        elif command == "PASS":
            outcome.passed, self.checking = True, False
            self.note("pass", what, text, arg)
        elif command in ("IGNORE", "STRIP"):
            outcome.edited = True
            if command == "STRIP":
                self.note("strip", what, text, arg)
            return b""
        elif command in ("PREPEND", "REPLACE"):
            if not arg or (what == "header" and not HEADER_NAME.match(arg.encode())):
                self.note("warning", "", f"{command} action without {'valid header' if arg else 'text'}", "")
                return None
            outcome.edited = True
            self.note(command.lower(), what, text, arg)
            new = arg.encode("utf-8") + b"\r\n"
            if command == "REPLACE":
                return new
            return new + original
        elif command == "REDIRECT":
            if "@" not in arg:  # Postfix's cleanup ignores it, with this warning
                self.note("warning", "", f"bad REDIRECT target \"{arg}\" in {param} map -- need user@domain", "")
                return None
            outcome.redirect = arg
            self.note("redirect", what, text, arg)
        elif command == "BCC":
            if "@" not in arg:  # Postfix's cleanup ignores it, with this warning
                self.note("warning", "", f"bad BCC address \"{arg}\" in {param} map -- need user@domain", "")
                return None
            if arg not in outcome.bcc:
                outcome.bcc.append(arg)
            self.note("bcc", what, text, arg)
        elif command == "FILTER" and ":" in arg:
            outcome.filter = arg
            self.note("filter", what, text, arg)
        elif command not in ("DUNNO", "OK"):
            self.note("warning", "", f"unknown command in {param} map: {value.strip()}", "")
        return None
