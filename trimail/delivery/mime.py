"""What the content needs from the next hop, and the 8-bit to 7-bit conversion for a
server that does not offer 8BITMIME (Postfix's mime_state with MIME_OPT_DOWNGRADE).

- ``content_needs_smtputf8``: RFC 6531 mail needs SMTPUTF8 downstream when the sender
  asked for it (``SMTPUTF8`` at MAIL) and an envelope address or a header line of any
  MIME entity really holds non-ASCII (Postfix: SMTPUTF8_FLAG_REQUESTED and the derived
  SENDER/RECIPIENT/HEADER flags; cleanup_out_header looks at every entity's headers,
  so an attachment's UTF-8 file name counts).  ``needs_smtputf8`` is the same for
  the envelope and one chunk's header section.  Such mail is never
  downgraded: without SMTPUTF8 at the next hop it bounces ``5.6.7``.
- ``Downgrader``: the content line by line; every MIME entity whose
  Content-Transfer-Encoding says ``8bit`` or ``binary`` is rewritten as Postfix
  rewrites it: a leaf entity's body becomes quoted-printable (soft breaks after 72
  columns, ``=``, controls and 8-bit bytes as ``=XX``, trailing white space encoded) and
  its header says ``quoted-printable``; a multipart or message/* entity (message/global
  aside) is relabelled ``7bit`` and its parts are converted one by one, boundaries and
  nested message/rfc822 headers understood.  Entities without an 8-bit label are
  passed as they are (Postfix does not guess either), and so is every header.

Security notes: memory is bounded whatever the content: a header block over
``MAX_HEADER_BLOCK`` or a header line over ``MAX_LINE`` ends conversion (the rest is
passed through unchanged), a body line over ``MAX_LINE`` is converted in pieces, and the
boundary stack holds at most ``MAX_DEPTH`` entries (deeper nesting is passed through).
Nothing here raises on malformed MIME: bad input is passed through.  Every pattern
applied to header text is linear (a value of 1 MiB of unclosed ``(`` once held the
event loop for minutes).  ``content_needs_smtputf8`` reads the content one more time
(only for SMTPUTF8 mail to a server without SMTPUTF8 or 8BITMIME), with the same
bounds and no conversion work.  Both work on at most ``SLICE`` bytes of input
between two checkpoints, so a large message does not stall the event loop.

Parameters: disable_mime_output_conversion (read by the delivery agent).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable

import trio

MAX_LINE = 64 * 1024
MAX_HEADER_BLOCK = 1 << 20
MAX_DEPTH = 32
SLICE = 64 * 1024  # input worked on between two checkpoints

_HEADER_NAME = re.compile(rb"[!-9;-~]+[ \t]*:")
_BOUNDARY = re.compile(rb'(?i);\s*boundary\s*=\s*(?:"([^"]{1,200})"|([^;\s"]{1,200}))')
# an innermost RFC 822 comment: linear (``[^)]*`` backtracked over every unclosed "(")
_COMMENT = re.compile(rb"\([^()]*\)")
_PLAIN = re.compile(rb"[\t\x20-\x3c\x3e-\x7e]*")  # bytes quoted-printable leaves alone

Content = Callable[[], AsyncIterator[bytes]]


def header_section(chunk: bytes) -> bytes:
    end = chunk.find(b"\r\n\r\n")
    if end < 0:
        end = chunk.find(b"\n\n")
    return chunk if end < 0 else chunk[:end]


def needs_smtputf8(sender: str, recipients: list[str], first_chunk: bytes) -> bool:
    """Whether mail sent with SMTPUTF8 at MAIL cannot be delivered without it."""
    if not all(address.isascii() for address in (sender, *recipients)):
        return True
    return not header_section(first_chunk).isascii()


async def content_needs_smtputf8(sender: str, recipients: list[str], content: Content) -> bool:
    """Whether mail sent with SMTPUTF8 at MAIL cannot be delivered without it, looking
    at the envelope and at the header lines of every MIME entity (Postfix raises
    SMTPUTF8_FLAG_HEADER for any of them: an attachment's UTF-8 file name counts).
    Reads *content* once, up to the first UTF-8 header; bodies are skipped, not
    converted.  Where the structure is past the converter's bounds, any non-ASCII
    byte counts (it cannot be told from a header)."""
    if not all(address.isascii() for address in (sender, *recipients)):
        return True
    scan = _HeaderScan()
    async for chunk in _slices(content):
        scan.feed(chunk)
        if scan.found:
            return True
    scan.finish()
    return scan.found


async def _slices(content: Content) -> AsyncIterator[bytes]:
    """*content* in pieces of at most SLICE bytes, with a checkpoint before each: the
    line-by-line work on one 1 MiB queue chunk would otherwise hold the event loop
    (and every session of serve) for up to half a second."""
    async for chunk in content():
        for start in range(0, len(chunk), SLICE):
            await trio.lowlevel.checkpoint()
            yield chunk[start:start + SLICE]


def downgraded(content: Content) -> Content:
    async def converted() -> AsyncIterator[bytes]:
        downgrader = Downgrader()
        async for chunk in _slices(content):
            out = downgrader.feed(chunk)
            if out:
                yield out
        out = downgrader.finish()
        if out:
            yield out

    return converted


class Downgrader:
    def __init__(self) -> None:
        self._partial = bytearray()
        self._out = bytearray()
        self._in_headers = True
        self._headers: list[bytes] = []
        self._header_size = 0
        self._boundaries: list[bytes] = []  # b"--" + boundary, outermost first
        self._convert = False  # this body is (part of) an entity labelled 8bit/binary
        self._qp = bytearray()  # the quoted-printable line being built
        self._passthrough = False

    def feed(self, chunk: bytes) -> bytes:
        if self._passthrough:
            return chunk
        self._partial += chunk
        start = 0
        while (lf := self._partial.find(b"\n", start)) >= 0:
            self._line(bytes(self._partial[start:lf + 1]), hard=True)
            start = lf + 1
            if self._passthrough:
                self._out += self._partial[start:]
                start = len(self._partial)
                break
        del self._partial[:start]
        while len(self._partial) > MAX_LINE and not self._passthrough:
            piece = bytes(self._partial[:MAX_LINE])
            del self._partial[:MAX_LINE]
            if self._in_headers:
                self._stop(piece + bytes(self._partial))
                self._partial.clear()
            else:
                self._body(piece, hard=False)
        out, self._out = bytes(self._out), bytearray()
        return out

    def finish(self) -> bytes:
        if self._partial and not self._passthrough:
            self._line(bytes(self._partial), hard=False)
            self._partial.clear()
        if self._in_headers and not self._passthrough:
            self._end_headers()
        self._flush_qp(hard=False)
        out, self._out = bytes(self._out), bytearray()
        return out

    def _stop(self, rest: bytes) -> None:
        """Too big to convert: everything held and everything after goes out as it came."""
        self._flush_qp(hard=False)
        self._out += b"".join(self._headers) + rest
        self._headers = []
        self._passthrough = True

    def _line(self, line: bytes, hard: bool) -> None:
        if self._in_headers:
            if line.strip(b"\r\n") == b"" and hard:
                self._end_headers(line)
                return
            if line[:1] in (b" ", b"\t") and self._headers or _HEADER_NAME.match(line):
                self._headers.append(line)
                self._header_size += len(line)
                if self._header_size > MAX_HEADER_BLOCK:
                    self._stop(b"")
                return
            self._end_headers()  # a body line without the empty line first
            if self._in_headers:  # message/rfc822: the line may open the nested headers
                self._line(line, hard)
                return
        if line.startswith(b"--") and self._boundaries and self._boundary(line):
            return
        self._body(line, hard)

    def _boundary(self, line: bytes) -> bool:
        text = line.rstrip(b"\r\n").rstrip(b" \t")
        for depth in range(len(self._boundaries) - 1, -1, -1):
            boundary = self._boundaries[depth]
            if text.startswith(boundary):
                self._flush_qp(hard=False)
                self._out += line
                if text[len(boundary):len(boundary) + 2] == b"--":
                    del self._boundaries[depth:]  # the epilogue: 7bit domain
                    self._in_headers, self._convert = False, False
                else:
                    del self._boundaries[depth + 1:]  # the next part: its own headers
                    self._in_headers, self._headers, self._header_size = True, [], 0
                return True
        return False

    def _end_headers(self, blank: bytes = b"") -> None:
        ctype, boundary, cte = _entity(self._headers)
        eight = cte in (b"8bit", b"binary")
        for header in _without_cte(self._headers) if eight else self._headers:
            self._out += header
        if eight:
            container = ctype.startswith(b"multipart/") or (ctype.startswith(b"message/")
                                                            and ctype != b"message/global")
            self._out += b"Content-Transfer-Encoding: " + (b"7bit" if container else b"quoted-printable") \
                + b"\r\n"
        self._out += blank
        self._headers, self._header_size = [], 0
        if ctype == b"message/rfc822":  # the nested message's own headers come next
            self._in_headers, self._convert = True, False
            return
        self._in_headers = False
        self._convert = eight
        if ctype.startswith(b"multipart/") and boundary:
            if len(self._boundaries) >= MAX_DEPTH:
                self._stop(b"")
                return
            self._boundaries.append(b"--" + boundary)

    def _body(self, line: bytes, hard: bool) -> None:
        if not self._convert:
            self._out += line
            return
        text = line[:-1] if hard and line.endswith(b"\n") else line
        if hard and text.endswith(b"\r"):
            text = text[:-1]
        qp = self._qp
        if len(qp) + len(text) <= 72 and _PLAIN.fullmatch(text):
            qp += text  # the common case: nothing to encode, no soft break needed
        else:
            for ch in text:
                if len(qp) > 72:
                    self._out += qp + b"=\r\n"
                    qp.clear()
                if (ch < 32 and ch != 9) or ch == 61 or ch > 126:
                    qp += b"=%02X" % ch
                else:
                    qp.append(ch)
        if hard:
            self._flush_qp(hard=True)

    def _flush_qp(self, hard: bool) -> None:
        qp = self._qp
        if hard:
            if qp and qp[-1] in (32, 9):
                last = qp.pop()
                qp += b"=%02X" % last
            self._out += qp + b"\r\n"
        elif qp:
            self._out += qp + b"=\r\n"  # more of this line may follow in another record
        qp.clear()


class _HeaderScan(Downgrader):
    """The converter's MIME structure, looking only for a non-ASCII header line."""

    def __init__(self) -> None:
        super().__init__()
        self.found = False

    def feed(self, chunk: bytes) -> bytes:
        if self._passthrough:
            self.found = self.found or not chunk.isascii()
            return b""
        self._check(super().feed(chunk))
        return b""

    def finish(self) -> bytes:
        self._check(super().finish())
        return b""

    def _check(self, out: bytes) -> None:
        """Past the bounds everything held and the rest are passed on as they came
        (otherwise the output holds only ASCII-checked header lines and boundaries)."""
        if self._passthrough:
            self.found = self.found or not out.isascii()

    def _line(self, line: bytes, hard: bool) -> None:
        if self._in_headers and not line.isascii() and (
                line[:1] in (b" ", b"\t") and self._headers or _HEADER_NAME.match(line)):
            self.found = True
        super()._line(line, hard)

    def _body(self, line: bytes, hard: bool) -> None:
        pass  # bodies do not count (and are not converted)


def _unfolded(headers: list[bytes]) -> list[bytes]:
    out: list[bytes] = []
    for line in headers:
        if line[:1] in (b" ", b"\t") and out:
            out[-1] += b" " + line.strip()
        else:
            out.append(line.strip())
    return out


def _entity(headers: list[bytes]) -> tuple[bytes, bytes, bytes]:
    """(content type, multipart boundary, transfer encoding) from a header block; the
    defaults are text/plain and 7bit, the first of repeated headers wins."""
    ctype, boundary, cte = b"", b"", b""
    for header in _unfolded(headers):
        name, _, value = header.partition(b":")
        name = name.strip().lower()
        if name == b"content-type" and not ctype:
            ctype = value.split(b";", 1)[0].strip().lower() or b"text/plain"
            m = _BOUNDARY.search(value)
            boundary = (m.group(1) or m.group(2)) if m else b""
        elif name == b"content-transfer-encoding" and not cte:
            for _ in range(8):  # nested comments, innermost first; each pass is linear
                value, found = _COMMENT.subn(b"", value)
                if not found:
                    break
            cte = value.strip().lower()
    return ctype or b"text/plain", boundary, cte or b"7bit"


def _without_cte(headers: list[bytes]) -> list[bytes]:
    out: list[bytes] = []
    dropping = False
    for line in headers:
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                out.append(line)
            continue
        dropping = line.split(b":", 1)[0].strip().lower() == b"content-transfer-encoding"
        if not dropping:
            out.append(line)
    return out
