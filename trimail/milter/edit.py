"""A message as the milters see and edit it (Postfix's cleanup_milter.c): the
header fields, the body, the envelope sender and recipients; ``apply`` makes the
edits a filter asked for at end of message; ``Content.build`` writes the result.

Header indexes follow Postfix's Sendmail compatibility: the filters never see our own
``Received:`` header; a change or delete counts the instances of a name without it
(``Received`` #1 is the client's first), an insert counts positions with it (0: above
it, 1: just below).  A value a filter gives is folded with CRLF and each
continuation line keeps a leading white space, so no edit can end the header section
or start a header of its own.  An address with a control character (a CR LF that
would write an SMTP command of the filter's own) is an edit that cannot be made.
SMFIR_ADDRCPT's address is stored as smtpd stores a RCPT (``Content.stored``:
``<archive>`` is ``archive@$myorigin``, a final dot goes), as Postfix's cleanup
rewrites it; one that does not resolve is kept as the filter gave it.
SMFIR_DELRCPT deletes each recipient that is the same address (cleanup's duplicate
filter's ``recipient_key``: not case, quoting, a final dot) as the one the queue
stores for the address named (``Content.stored``: smtpd's resolution): a filter
names what it saw at RCPT, ``<bob@x.>`` or ``<bob>``, and the queue holds ``bob@x``
or ``bob@$myorigin`` (red team 35a: kept).

Memory: the header section is held (it is bounded by header_size_limit before the
milters run); the body stays in the spool and is read in chunks, and a replaced body
goes to a spool of its own.

Parameters: none read.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable

import trio

from trimail.cleanup.rewrite import recipient_key
from trimail.milter.protocol import Modification
from trimail.queue.spool import Spool

_NAME = re.compile(r"[!-9;-~]+\Z")
_FIELD = re.compile(rb"[!-9;-~]+[ \t]*:")


class Header:
    __slots__ = ("name", "own", "raw")

    def __init__(self, raw: bytes, own: bool = False) -> None:
        self.raw = raw  # the whole field with its CRLFs
        self.name = raw.split(b":", 1)[0].rstrip(b" \t").decode("ascii", "replace")
        self.own = own

    def value(self) -> str:
        """The value after the colon, folded lines joined with LF (as Sendmail sends them)."""
        text = self.raw.split(b":", 1)[1]
        return text.removesuffix(b"\r\n").replace(b"\r\n", b"\n").decode("utf-8", "surrogateescape")


def split_header(data: bytes) -> tuple[list[bytes], int]:
    """The header fields at the start of *data* and the offset where the body starts
    (after the empty line, or at the first line that is not a header field)."""
    fields: list[bytes] = []
    pos = 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        end = len(data) if end < 0 else end + 1
        line = data[pos:end]
        if line in (b"\r\n", b"\n"):
            return fields, end
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        elif _FIELD.match(line):
            fields.append(line)
        else:
            return fields, pos
        pos = end
    return fields, pos


class Content:
    """The message being filtered: envelope, header fields, body (*spool* from
    *body_offset*, or the replacement)."""

    def __init__(self, spool: Spool, header: bytes, body_offset: int, *, own_first: bool,
                 sender: str, recipients: list[str], directory=None, size_limit: int = 0,
                 stored: Callable[[str], str] | None = None) -> None:
        fields, _ = split_header(header)
        self.headers = [Header(raw, own=own_first and i == 0) for i, raw in enumerate(fields)]
        self.spool = spool
        self.body_offset = body_offset
        self.sender = sender
        self.recipients = list(recipients)
        self.directory = directory
        self.new_body: Spool | None = None
        self.size_limit = size_limit  # most bytes a replaced body may have (0: no limit)
        self.stored = stored  # the recipient the queue stores for an address as the filters saw it at RCPT
        self.changed = False  # headers or body edited: the content must be written again

    def queued_form(self, address: str) -> str:
        """*address* as the queue stores it (``stored``); as it is when it does not resolve."""
        return (self.stored(address) if self.stored is not None and address else "") or address

    def visible_headers(self) -> list[tuple[str, str]]:
        return [(h.name, h.value()) for h in self.headers if not h.own]

    async def body_chunks(self, size: int) -> AsyncIterator[bytes]:
        source = self.new_body if self.new_body is not None else self.spool
        skip = 0 if self.new_body is not None else self.body_offset
        if source.getvalue() is not None:  # in memory: no thread
            data = source.getvalue()
            for start in range(skip, len(data), size):
                yield data[start:start + size]
            return
        chunks = source.chunks(size)
        while (chunk := await trio.to_thread.run_sync(next, chunks, None)) is not None:
            if skip >= len(chunk):
                skip -= len(chunk)
                continue
            yield chunk[skip:]
            skip = 0

    async def build(self) -> Spool:
        """The edited message in a new spool (the caller discards the old one)."""
        out = Spool(self.directory)
        await out.write_async(b"".join(h.raw for h in self.headers) + b"\r\n")
        carry, tail = b"", b""  # a replaced body's line ends become CRLF (Postfix reads it by lines)
        async for chunk in self.body_chunks(1 << 16):
            if self.new_body is not None:
                chunk = carry + chunk
                carry = b"\r" if chunk.endswith(b"\r") else b""
                chunk = _crlf(chunk[:len(chunk) - len(carry)])
                tail = (tail + chunk)[-2:]
            await out.write_async(chunk)
        if self.new_body is not None and (carry or (self.new_body.size and tail != b"\r\n")):
            await out.write_async(b"\r\n")
        await out.finish()
        return out


def _crlf(data: bytes) -> bytes:
    return re.sub(rb"\r?\n|\r", b"\r\n", data)


def _field(name: str, value: str, leading_space: bool) -> bytes:
    if not _NAME.match(name):
        raise ValueError(f"bad header name: {name[:100]!r}")
    lines = value.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    # a continuation line of white space only is left out: a reader that trims it sees
    # the empty line that ends the header section, and the rest as the body
    lines = [lines[0]] + [line if line[:1] in (" ", "\t") else "\t" + line for line in lines[1:] if line.strip()]
    text = f"{name}:{'' if leading_space else ' '}" + "\r\n".join(lines) + "\r\n"
    return text.encode("utf-8", "surrogateescape")


def _address(text: str) -> str:
    """The address of SMFIR_ADDRCPT / CHGFROM / DELRCPT; ValueError for one with a
    control character (CR LF would end the RCPT TO or MAIL FROM line it is sent in,
    and no delivery could ever format it)."""
    text = text.strip()
    if any(ord(ch) < 0x20 or ch == "\x7f" for ch in text):
        raise ValueError(f"control character in address {text[:100]!r}")
    return text[1:-1] if text.startswith("<") and text.endswith(">") else text


def apply(content: Content, edits: list[Modification], leading_space: bool) -> None:
    """Make *edits* (one filter's, in order) on *content*; ValueError for an edit that
    cannot be made (a bad header name), which costs the filter its turn."""
    for edit in edits:
        kind = edit.kind
        if kind == "addheader":
            content.headers.append(Header(_field(edit.name, edit.value, leading_space)))
        elif kind == "insheader":
            index = min(edit.index, len(content.headers))
            content.headers.insert(index, Header(_field(edit.name, edit.value, leading_space)))
        elif kind == "chgheader":
            wanted, name = max(edit.index, 1), edit.name.lower()
            if not edit.name:
                raise ValueError("null change header name")
            match = [i for i, h in enumerate(content.headers) if not h.own and h.name.lower() == name]
            if len(match) >= wanted:
                if edit.value:
                    content.headers[match[wanted - 1]] = Header(_field(edit.name, edit.value, leading_space))
                else:
                    del content.headers[match[wanted - 1]]
            elif edit.value:  # Postfix: change a header that is not there appends it
                content.headers.append(Header(_field(edit.name, edit.value, leading_space)))
        elif kind == "chgfrom":
            content.sender = _address(edit.value)
            continue
        elif kind == "addrcpt":  # stored as smtpd stores a RCPT (Postfix's cleanup rewrites it too)
            address = content.queued_form(_address(edit.value))
            if address and address not in content.recipients:
                content.recipients.append(address)
            continue
        elif kind == "delrcpt":  # as the filter saw it at RCPT: the queue's spelling may differ (a final dot)
            key = recipient_key(content.queued_form(_address(edit.value)))
            content.recipients = [r for r in content.recipients if recipient_key(r) != key]
            continue
        elif kind == "replbody":
            if content.new_body is None:
                content.new_body = Spool(content.directory)
            content.new_body.write(edit.data)
            if content.size_limit and content.new_body.size > content.size_limit:
                raise ValueError(f"body replacement exceeds {content.size_limit} bytes")
        content.changed = True
