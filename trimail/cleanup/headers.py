"""Header sections as cleanup(8) treats them: split a message into header and body,
walk its fields, find the addresses in a header value (``address_spans``) and rewrite
them, read a header's address list safely (``header_addresses``), complete a local
submission's missing ``From:``, ``Date:`` and ``Message-ID:``, and give every line a
CRLF end.  Pure functions: bytes or text in, bytes or text out.

Parameters: none read (callers pass the values).
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Callable


def address_spans(value: str) -> list[tuple[int, int]]:
    """Where the addr-specs of an address-list header *value* are: inside ``<...>``,
    or a bare mailbox less its comments; phrases, quoted strings, comments and group
    names are never addresses.  A bare mailbox with a comment or white space inside
    is left out (nothing is rewritten that is not surely an address)."""
    spans: list[tuple[int, int]] = []
    start, angle, depth, quoted, literal, escaped = 0, -1, 0, False, False, False
    angle_span: tuple[int, int] | None = None
    for i, ch in enumerate(value + ","):
        if escaped:
            escaped = False
        elif ch == "\\" and (quoted or depth):
            escaped = True
        elif quoted:
            quoted = ch != '"'
        elif depth:
            depth += {"(": 1, ")": -1}.get(ch, 0)
        elif literal:
            literal = ch != "]"
        elif ch == '"':
            quoted = True
        elif ch == "(":
            depth = 1
        elif ch == "[":
            literal = True
        elif angle >= 0:
            if ch == ">":
                angle_span, angle = (angle, i), -1
        elif ch == "<":
            angle = i + 1
        elif ch == ":":  # a group's name ends
            start, angle_span = i + 1, None
        elif ch in ",;":
            if angle_span is not None:
                spans.append(angle_span)
            elif (bare := _bare(value, start, i)) is not None:
                spans.append(bare)
            start, angle_span = i + 1, None
    return [(a, b) for a, b in spans if b > a]


def _bare(value: str, start: int, end: int) -> tuple[int, int] | None:
    """The span of a mailbox without angle brackets, its comments around it trimmed."""
    text = value[start:end]
    core = re.sub(r"\((?:[^()\\]|\\.)*\)", lambda m: " " * len(m.group(0)), text)
    if "(" in core:  # nested comments: leave it alone
        return None
    stripped = core.strip()
    if not stripped or any(ch.isspace() for ch in stripped):
        return None
    first = core.index(stripped)
    return start + first, start + first + len(stripped)


def rewrite_header_value(value: str, one: Callable[[str], str]) -> str:
    """*value* with each address (``address_spans``) replaced by ``one(address)``."""
    out, last = [], 0
    for begin, end in address_spans(value):
        out += [value[last:begin], one(value[begin:end])]
        last = end
    return "".join(out) + value[last:]


def split_header(content: bytes) -> tuple[bytes, bytes]:
    """(header section including its final CRLF, rest starting at the blank line)."""
    if content.startswith(b"\r\n"):
        return b"", content
    end = content.find(b"\r\n\r\n")
    if end < 0:
        return content, b""
    return content[: end + 2], content[end + 2:]


def header_fields(header: bytes) -> list[bytes]:
    """The header section as a list of whole fields (with their continuation lines)."""
    fields: list[bytes] = []
    for line in header.split(b"\r\n")[:-1] if header.endswith(b"\r\n") else header.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\r\n" + line
        else:
            fields.append(line)
    return fields


def field_name(field: bytes) -> str:
    return field.split(b":", 1)[0].strip().decode("ascii", "replace").lower()


def rewrite_headers(content: bytes, rewrites: dict[str, Callable[[str], str]]) -> bytes:
    """*content* with the addresses in the headers *rewrites* names (lower case)
    rewritten by the function given for each; the body is never touched."""
    if not rewrites:
        return content
    header, rest = split_header(content)
    out = []
    for field in header_fields(header):
        one = rewrites.get(field_name(field))
        if one is not None:
            name, _, value = field.partition(b":")
            text = value.decode("utf-8", "surrogateescape")
            field = name + b":" + rewrite_header_value(text, one).encode("utf-8", "surrogateescape")
        out.append(field)
    return b"".join(f + b"\r\n" for f in out) + rest


def complete_headers(content: bytes, *, sender: str, full_name: str | None, hostname: str,
                     queue_id: str, date: float | None = None) -> bytes:
    """Add From:, Date: (*date*, else now) and Message-ID: when a message that is
    submitted locally, or comes from a local-context SMTP client, lacks them."""
    header, rest = split_header(content)
    present = {field_name(f) for f in header_fields(header)}
    added = []
    if "from" not in present:
        shown = email.utils.formataddr((full_name, sender)) if full_name else f"<{sender}>" if sender else \
            f"MAILER-DAEMON@{hostname}"
        added.append(f"From: {shown}")
    if "date" not in present:
        added.append(f"Date: {email.utils.formatdate(date, localtime=True)}")
    if "message-id" not in present:
        added.append(f"Message-Id: <{queue_id}@{hostname}>")
    extra = "".join(line + "\r\n" for line in added).encode("utf-8")
    if not rest:
        rest = b"\r\n"
    return header + extra + rest


def local_received(hostname: str, mail_name: str, uid: int, queue_id: str) -> bytes:
    """The ``Received:`` line of a local submission by *uid*, as Postfix's cleanup
    writes it (by trimail.cleanup.submit, or by serve for a user: cleanup/pickup.py)."""
    return (f"Received: by {hostname} ({mail_name}, from userid {uid})\r\n"
            f"\tid {queue_id}; {email.utils.formatdate(localtime=True)}\r\n").encode()

def normalize_newlines(data: bytes) -> bytes:
    """Any of CRLF, bare LF, bare CR line ends to CRLF."""
    return re.sub(rb"\r\n|\r|\n", b"\r\n", data)


def header_addresses(value: str) -> list[tuple[str, str]]:
    """``email.utils.getaddresses`` of one header value, safe on hostile input: its
    comment parser recurses once per level of nesting, and a ``From:`` of 2,000 ``(``
    raised RecursionError inside a session (red team 31).  Then the value is read
    again without its comments (``without_comments``): the addresses are the same,
    only the display names that comments gave are lost."""
    try:
        return email.utils.getaddresses([value])
    except RecursionError:
        return email.utils.getaddresses([without_comments(value)])


_FROM_FIELD = re.compile(rb"(?im)^from:(.*(?:\r\n[ \t].*)*)")


def from_field_addresses(header: bytes | bytearray) -> list[str]:
    """The addresses of the first ``From:`` field of *header* (a header section, CRLF
    line ends), in order; [] without one."""
    match = _FROM_FIELD.search(header)
    if not match:
        return []
    return [a for _, a in header_addresses(match.group(1).decode("utf-8", "replace")) if a]


def without_comments(value: str) -> str:
    """*value* with each comment, nested ones included, replaced by one space;
    quoted strings, domain literals and quoted pairs are kept as they are.  An
    unclosed comment runs to the end.  One pass, no recursion."""
    out: list[str] = []
    depth, quoted, literal, escaped = 0, False, False, False
    for ch in value:
        if escaped:
            escaped = False
            if not depth:
                out.append(ch)
            continue
        if ch == "\\" and (quoted or depth or literal):
            escaped = True
            if not depth:
                out.append(ch)
        elif depth:
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if not depth:
                out.append(" ")
        elif quoted:
            out.append(ch)
            quoted = ch != '"'
        elif literal:
            out.append(ch)
            literal = ch != "]"
        elif ch == "(":
            depth = 1
        else:
            out.append(ch)
            quoted, literal = ch == '"', ch == "["
    return "".join(out)
