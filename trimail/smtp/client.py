"""The SMTP client's protocol pieces, without I/O.

- ``ReplyParser``: bytes from the server in, complete (multi-line) replies out,
  with bounded line length and line count; of a reply's text at most
  ``MAX_REPLY_TEXT`` characters are kept (Postfix keeps line_length_limit, 2048),
  the rest is read, checked and dropped; a malformed reply raises
  ``PeerProtocolError`` (the server broke the protocol: the delivery defers).
- ``Extensions``: what an EHLO reply offers (PIPELINING, SIZE n, 8BITMIME, ...);
  ``first_word``: the server's name for itself in a greeting or EHLO reply.
- ``mail_command`` / ``rcpt_command``: the envelope commands with the parameters
  the server offered.
- ``DotStuffer``: message content (CRLF lines) to the DATA wire format: leading
  dots doubled, a final CRLF guaranteed, ``.CRLF`` at the end, and a stray CR or
  LF (content queued before receipt normalised it) sent as a space, so nothing
  trimail emits can end DATA early at a lax downstream.

Every answer of the server comes out as a ``Reply``; what it means for a
recipient (sent, deferred, bounced) is decided by the delivery side
(trimail.delivery.outcome), so this package knows nothing of delivery.
"""

from __future__ import annotations

import dataclasses
import re
from itertools import repeat

from trimail.smtp.address import ascii_upper
from trimail.smtp.content import (
    LINE_DOT,
    LINE_DOT_OR_BARE_LF,
    replace_stray_cr,
    replace_stray_cr_lf,
)
from trimail.smtp.replies import Reply

MAX_LINE = 4096
MAX_LINES = 1000
# characters of one reply's text kept: a hostile server's 1,000 lines of 4 KiB per
# RCPT reply were all held until the transaction ended (red team 39: 10 messages of
# 50 recipients in flight to one such destination took the qmgr from 43 MB to 2.35 GB)
MAX_REPLY_TEXT = 8192


class PeerProtocolError(Exception):
    """The server's bytes are not a valid SMTP reply."""


_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")


class ReplyParser:
    def __init__(self) -> None:
        self._buf = bytearray()
        self._lines: list[str] = []
        self._code: int | None = None
        self._count = 0  # lines of the reply read so far (kept or not)
        self._kept = 0  # characters of its text kept (MAX_REPLY_TEXT)

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_reply(self) -> Reply | None:
        """The next complete reply, or None when more bytes are needed."""
        while True:
            lf = self._buf.find(b"\n")
            if lf < 0:
                if len(self._buf) > MAX_LINE:
                    raise PeerProtocolError("reply line too long")
                return None
            raw = bytes(self._buf[:lf]).rstrip(b"\r")
            del self._buf[: lf + 1]
            if len(raw) > MAX_LINE:
                raise PeerProtocolError("reply line too long")
            line = raw.decode("utf-8", "replace")
            if len(line) < 3 or not _ascii_digits(line[:3]) or line[0] not in "12345" or (
                    len(line) > 3 and line[3] not in " -"):
                raise PeerProtocolError(f"malformed reply line {line[:80]!r}")
            code = int(line[:3])
            if self._code is not None and code != self._code:
                raise PeerProtocolError("reply code changed inside a multi-line reply")
            self._code = code
            self._count += 1
            if self._count > MAX_LINES:
                raise PeerProtocolError("reply has too many lines")
            text = line[4:]
            if self._kept + len(text) <= MAX_REPLY_TEXT or not self._lines:
                # a line is kept whole or not at all (a cut "SIZE 10240000" would be a
                # wrong limit); only the first, whose text has the enhanced code, is cut
                text = text[:MAX_REPLY_TEXT]
                self._lines.append(text)
                self._kept += len(text)
            else:
                self._kept = MAX_REPLY_TEXT  # and none after it: the kept lines stay in order
            if len(line) == 3 or line[3] == " ":
                return self._finish(code)

    def _finish(self, code: int) -> Reply:
        lines, self._lines, self._code = self._lines, [], None
        self._count = self._kept = 0
        enhanced = ""
        m = _ENHANCED.match(lines[0])
        if m and int(m.group(1)) == code // 100:
            enhanced = f"{m.group(1)}.{m.group(2)}.{m.group(3)}"
            lines = [_strip_enhanced(line, enhanced) for line in lines]
        return Reply(code, enhanced, tuple(lines) if len(lines) > 1 else lines[0])

    @property
    def pending(self) -> int:
        return len(self._buf)


def _strip_enhanced(line: str, enhanced: str) -> str:
    return line[len(enhanced) + 1:] if line.startswith(enhanced) else line


@dataclasses.dataclass(frozen=True, slots=True)
class Extensions:
    keywords: dict[str, str]

    @classmethod
    def from_ehlo(cls, reply: Reply) -> Extensions:
        keywords = {}
        for line in reply.lines()[1:]:
            word, _, arg = line.strip().partition(" ")
            if word:
                keywords[ascii_upper(word)] = arg.strip()
        return cls(keywords)

    def has(self, keyword: str) -> bool:
        return keyword in self.keywords

    @property
    def size_limit(self) -> int | None:
        value = self.keywords.get("SIZE")
        return int(value) if value and _ascii_digits(value) and int(value) > 0 else None


def first_word(reply: Reply) -> str:
    """The first word of a reply's first line: the name a server gives itself in its
    greeting and EHLO reply ("" when there is none)."""
    words = reply.lines()[0].split(None, 1)
    return words[0] if words else ""


def mail_command(sender: str, size: int | None, ext: Extensions, *, eight_bit: bool, smtputf8: bool,
                 dsn: tuple[str, ...] = ()) -> bytes:
    """MAIL FROM with SIZE (unless *size* is None: the content is converted on the way),
    BODY=8BITMIME, SMTPUTF8 and the *dsn* parameters (RET, ENVID) where the server
    offers them."""
    params = list(dsn) if dsn and ext.has("DSN") else []
    if size is not None and ext.has("SIZE"):
        params.append(f"SIZE={size}")
    if eight_bit and ext.has("8BITMIME"):
        params.append("BODY=8BITMIME")
    if smtputf8 and ext.has("SMTPUTF8"):
        params.append("SMTPUTF8")
    return (" ".join([f"MAIL FROM:<{_path(sender)}>", *params]) + "\r\n").encode("utf-8")


def rcpt_command(recipient: str, dsn: tuple[str, ...] = (), ext: Extensions | None = None) -> bytes:
    """RCPT TO, with the *dsn* parameters (NOTIFY, ORCPT) when the server offers DSN."""
    if dsn and ext is not None and ext.has("DSN"):
        return f"RCPT TO:<{_path(recipient)}> {' '.join(dsn)}\r\n".encode()
    return f"RCPT TO:<{_path(recipient)}>\r\n".encode()


def _path(address: str) -> str:
    """An address for MAIL FROM or RCPT TO; one with a control character would write a
    command of its own on the wire (CR LF), so it is never formatted: ValueError."""
    if any(ord(ch) < 0x20 or ch == "\x7f" for ch in address):
        raise ValueError(f"control character in address {address!r}")
    return address


class DotStuffer:
    """Content chunks (CRLF lines) to DATA wire format; call finish() for the end.

    A CR at the end of a chunk is held back until the next one shows whether an LF
    follows, so a CRLF split between two chunks is not taken for two stray ends.
    A line longer than *line_limit* bytes (without its CRLF; 0: no limit) is broken
    by inserting CRLF SPACE, as Postfix's smtp_line_length_limit does, "to minimize
    the damage to MIME formatted mail": a server may refuse a line past RFC 5322's
    998 (a milter's header of 900 KB bounced "500 Line too long", red team 34).
    """

    def __init__(self, line_limit: int = 0) -> None:
        self._at_line_start = True
        self._last = b"\n"
        self._held_cr = False
        self.line_limit = line_limit
        self._column = 0  # bytes of the line not ended yet (with line_limit)

    def stuff(self, chunk: bytes) -> bytes:
        if self._held_cr:
            chunk, self._held_cr = b"\r" + chunk, False
        if chunk.endswith(b"\r"):
            chunk, self._held_cr = chunk[:-1], True
        if not chunk:
            return b""
        if LINE_DOT_OR_BARE_LF.search(chunk) is None:  # nearly always: one pass for both
            out = chunk = self._limited(replace_stray_cr(chunk))
        else:
            chunk = self._limited(replace_stray_cr_lf(chunk))  # (a break never starts a line with a dot)
            out = chunk.replace(b"\n.", b"\n..") if LINE_DOT.search(chunk) else chunk
        if self._at_line_start and chunk.startswith(b"."):
            out = b"." + out
        self._at_line_start = chunk.endswith(b"\n")
        self._last = chunk[-1:]
        return out

    def _limited(self, chunk: bytes) -> bytes:
        """*chunk* (stray ends replaced: every LF follows a CR) with its lines past
        line_limit broken.  Measured by one split in C: a regex looking for a long
        run tried every position and cost 3-30 ms per 10 KiB (the bench showed it)."""
        limit = self.line_limit
        if not limit:
            return chunk
        first, final = chunk.find(b"\n"), chunk.rfind(b"\n")
        if first < 0:  # the line goes on
            too_long = self._column + len(chunk) > limit
        else:
            too_long = (self._column + first - 1 > limit or len(chunk) - final - 1 > limit
                        or self._may_have_long_line(chunk, first + 1, final + 1))
        if too_long:
            chunk = self._fold(chunk)
            final = chunk.rfind(b"\n")
        self._column = self._column + len(chunk) if final < 0 else len(chunk) - final - 1
        return chunk

    def _may_have_long_line(self, chunk: bytes, start: int, end: int) -> bool:
        """Could a line in chunk[start:end] (whole lines: the last LF is at end - 1) be
        longer than line_limit?  Such a line is a run of at least limit + 2 bytes
        without an LF (its CR counts), and a run that long contains a whole block of
        (limit + 3) // 2 bytes counted from *start*: when every block has an LF, no
        line is too long.  One memchr per block, the calls made by ``map`` in C (a
        generator of them cost 100 us per 100 KB of 80-byte lines, this 38, splitting
        the lines and measuring each 127).  The last block may reach past *end*: no
        LF follows it.  A block without an LF (a line of more than half the limit),
        or a small limit, sends the chunk to that exact test."""
        block = (self.line_limit + 3) // 2
        if block >= 256:
            starts, ends = range(start, end, block), range(start + block, end + block, block)
            if -1 not in map(chunk.find, repeat(b"\n"), starts, ends):
                return False
        return max(map(len, chunk[start:end].split(b"\n"))) > self.line_limit + 1

    def _fold(self, chunk: bytes) -> bytes:
        limit, column, lines = self.line_limit, self._column, []
        for line in chunk.split(b"\n"):  # each but the last with the CR of its CRLF
            text, cr = (line[:-1], b"\r") if line.endswith(b"\r") else (line, b"")
            parts, start = [], 0
            while column + len(text) - start > limit:
                take = max(limit - column, 0) if not parts else max(limit - 1, 1)  # after a break: " " + text
                parts.append(text[start:start + take] + b"\r\n ")
                start, column = start + take, 1
            parts.append(text[start:] + cr)
            lines.append(b"".join(parts))
            column = 0
        return b"\n".join(lines)

    def finish(self) -> bytes:
        tail = b""
        if self._held_cr:  # a CR at the very end of the content is stray too
            self._held_cr = False
            tail, self._last = b" ", b" "
        return tail + (b"" if self._last == b"\n" else b"\r\n") + b".\r\n"


def _ascii_digits(text: str) -> bool:
    """0-9 only: ``str.isdigit`` also accepts "²" and other digits ``int`` refuses."""
    return text.isascii() and text.isdigit()
