"""One captured message as Mailpit shows it: the part tree with Mailpit's part IDs,
its Text and HTML, Attachments and Inline parts, the address headers as contacts,
the header fields as Go's ``net/mail`` reads them.  Pure functions of the raw bytes
(no I/O); ``MessageView`` parses once and caches.

Mailpit reads messages with the Go library enmime; what a client sees follows from
enmime's rules, re-stated here (not translated): part IDs ``1``, ``2``, ``1.1`` (a
nested multipart part gets ``.0`` after its children are numbered); Text is the
text/plain parts that are not attachments (in a multipart/alternative the first one
breadth-first, otherwise all of them depth-first joined by ``\\n--\\n``), keeping the
message's own line ends; HTML the first text/html that is not an attachment; an
HTML-only message gets a Text made from its HTML.  Attachments are the parts with
``Content-Disposition: attachment`` or type application/octet-stream; Inline the
``inline`` parts and the other non-text parts with no disposition; both only when
they have a file name or a Content-ID.
"""

from __future__ import annotations

import dataclasses
import email
import email.message
import email.parser
import email.policy
import email.utils
import hashlib
import re
from datetime import UTC, datetime
from functools import cached_property

from trimail.catch.text import decode_words, html_to_text, no_surrogates
from trimail.cleanup.headers import header_addresses

OCTET_STREAM = "application/octet-stream"
MAX_PARTS = 1000  # parts shown per message (a real one has a handful)
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_MEDIA_TYPE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9a-z]+/[!#$%&'*+\-.^_`|~0-9a-z]+$")


def go_time(moment: datetime) -> str:
    """RFC 3339 as Go's RFC3339Nano writes it: fraction without trailing zeros, ``Z`` for UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    base = moment.strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{moment.microsecond:06d}".rstrip("0")
    offset = moment.utcoffset()
    if not offset:
        zone = "Z"
    else:
        minutes = int(offset.total_seconds()) // 60
        sign = "+" if minutes >= 0 else "-"
        zone = f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
    return f"{base}{'.' + fraction if fraction else ''}{zone}"


def created_time(moment: datetime) -> str:
    """Mailpit's ``Created``: milliseconds in UTC, written with all three digits
    (clients that parse Go's trimmed fractions by hand accept this form too)."""
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def canonical_key(name: str) -> str:
    """Go's CanonicalMIMEHeaderKey: ``message-id`` -> ``Message-Id``; a name with a
    byte that is not a token character is left as it is."""
    if not _TOKEN.match(name):
        return name
    return "-".join(word[:1].upper() + word[1:].lower() for word in name.split("-"))


def header_fields(raw: bytes) -> list[tuple[str, str]]:
    """The header block as (name, value) pairs, continuation lines joined by one
    space and values trimmed, not decoded (Go's textproto.ReadMIMEHeader)."""
    end = len(raw)
    for marker in (b"\r\n\r\n", b"\n\n"):
        at = raw.find(marker)
        if at != -1:
            end = min(end, at)
    fields: list[tuple[str, str]] = []
    for line in raw[:end].decode("utf-8", "replace").splitlines():
        if line[:1] in (" ", "\t"):
            if fields:
                name, value = fields[-1]
                piece = line.strip()
                fields[-1] = (name, f"{value} {piece}" if value else piece)
            continue
        name, colon, value = line.partition(":")
        if colon and name.strip():
            fields.append((canonical_key(name.strip()), value.strip()))
    return fields


MAX_ADDRESS_TEXT = 65536  # characters of one address header read for addresses (1,000s of them)


@dataclasses.dataclass(slots=True)
class Part:
    part_id: str
    content_type: str
    disposition: str
    filename: str
    content_id: str
    content: bytes
    charset: str | None
    multipart: bool
    children: list[Part]

    def text(self) -> str:
        for charset in (self.charset or "utf-8", "utf-8"):
            try:
                return no_surrogates(self.content.decode(charset))  # UTF-7 decodes to lone surrogates
            except (LookupError, UnicodeDecodeError):
                continue
        return self.content.decode("utf-8", "replace")

    def summary(self) -> dict[str, object]:
        """Mailpit's Attachment object."""
        return {"PartID": self.part_id, "FileName": self.filename, "ContentType": self.content_type,
                "ContentID": self.content_id, "Size": len(self.content),
                "Checksums": {"MD5": hashlib.md5(self.content, usedforsecurity=False).hexdigest(),
                              "SHA1": hashlib.sha1(self.content, usedforsecurity=False).hexdigest(),
                              "SHA256": hashlib.sha256(self.content).hexdigest()}}


def _payload(message: email.message.Message) -> bytes:
    if message.get_content_maintype() == "message" and message.is_multipart():
        inner = message.get_payload(0)
        if not isinstance(inner, email.message.Message):
            return b""
        try:
            return inner.as_bytes()
        except Exception:  # noqa: BLE001 - the stdlib generator on a broken inner message: show nothing
            return b""
    try:
        payload = message.get_payload(decode=True)
    except (ValueError, TypeError, AssertionError):
        payload = None
    return payload if isinstance(payload, bytes) else b""


def _part(message: email.message.Message, part_id: str, depth: int, budget: list[int]) -> Part:
    """One part and its children; *budget* (one counter shared by the whole tree)
    bounds the parts shown, so the JSON and the page of a 100,000-part message stay small."""
    budget[0] -= 1
    multipart = message.get_content_maintype() == "multipart" and message.is_multipart()
    filename = message.get_filename() or message.get_param("file", None) or ""
    if not isinstance(filename, str):
        filename = email.utils.collapse_rfc2231_value(filename)
    content_type = message.get_content_type()
    if not _MEDIA_TYPE.match(content_type):  # folded or hostile: it goes into an HTTP header later
        content_type = OCTET_STREAM
    part = Part(part_id=part_id, content_type=content_type,
                disposition=message.get_content_disposition() or "", filename=decode_words(filename),
                content_id=no_surrogates(str(message.get("Content-ID", ""))).strip().strip("<>"),
                content=b"" if multipart else _payload(message),
                charset=message.get_content_charset(), multipart=multipart, children=[])
    if multipart and depth < 50:  # nesting deeper than any real message: the rest is one leaf
        payload = message.get_payload()
        for index, child in enumerate(payload if isinstance(payload, list) else [], 1):
            if budget[0] <= 0:  # more parts than any real message: the rest is not shown
                break
            child_id = str(index) if depth == 0 else f"{part_id}.{index}"
            part.children.append(_part(child, child_id, depth + 1, budget))
        if depth > 0:
            part.part_id += ".0"
    return part


MAX_PARAMS_FIELD = 8192  # characters of a Content-Type/-Disposition field given to the parser
_PARAMS_FIELD = re.compile(rb"^(content-(?:type|disposition)[ \t]*:)([^\r\n]*(?:\r?\n[ \t][^\r\n]*)*)",
                           re.IGNORECASE | re.MULTILINE)


def _short_params(raw: bytes) -> bytes:
    """*raw* with every Content-Type and Content-Disposition field cut to
    ``MAX_PARAMS_FIELD`` characters: the stdlib reads parameters by slicing the rest
    of the field at each ``;`` (quadratic: 200,000 parameters took 34 s), and no real
    field is longer than a few hundred."""
    if not any(len(m.group(2)) > MAX_PARAMS_FIELD for m in _PARAMS_FIELD.finditer(raw)):
        return raw
    return _PARAMS_FIELD.sub(lambda m: m.group(1) + m.group(2)[:MAX_PARAMS_FIELD].rstrip(b"\r\n"), raw)


def _breadth(root: Part) -> list[Part]:
    found, level = [], [root]
    while level:
        found += level
        level = [child for part in level for child in part.children]
    return found


def _depth(root: Part) -> list[Part]:
    found = [root]
    for child in root.children:
        found += _depth(child)
    return found


class MessageView:
    """The parsed message, Mailpit's fields computed on first use."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self._decoded: dict[str, str] = {}  # header fields by name; "\0html" ...: what was read of the HTML
        self._addresses: dict[str, list[dict[str, str]]] = {}

    @cached_property
    def root(self) -> Part:
        """The part tree, decoded; the parser's own objects are not kept (memory).
        The stdlib parser recurses once per nesting level: a message nested deeper
        than the interpreter's stack (a few hundred levels) is shown as one leaf
        with its header fields, instead of failing every list that includes it."""
        try:
            return _part(email.message_from_bytes(_short_params(self.raw), policy=email.policy.compat32), "0", 0,
                         [MAX_PARTS])
        except RecursionError:
            flat = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(self.raw, headersonly=True)
            part = _part(flat, "0", 0, [MAX_PARTS])
            part.multipart, part.children, part.content = False, [], b""
            return part

    @cached_property
    def fields(self) -> list[tuple[str, str]]:
        return header_fields(self.raw)

    def header(self, name: str) -> str:
        """The first field called *name*, decoded (enmime's GetHeader); remembered,
        since every list and page asks again."""
        key = canonical_key(name)
        if key not in self._decoded:
            self._decoded[key] = next((decode_words(value) for field, value in self.fields if field == key), "")
        return self._decoded[key]

    def headers(self) -> dict[str, list[str]]:
        """Every field, Go's ``mail.Header`` map: canonical name -> values in order."""
        result: dict[str, list[str]] = {}
        for name, value in self.fields:
            result.setdefault(name, []).append(value)
        return result

    def addresses(self, name: str) -> list[dict[str, str]]:
        """The addresses of the fields called *name*, remembered; a list longer than
        ``MAX_ADDRESS_TEXT`` characters is read up to there (no real header is)."""
        key = canonical_key(name)
        if key not in self._addresses:
            text = ", ".join(v for field, v in self.fields if field == key)
            if len(text) > MAX_ADDRESS_TEXT:
                text = text[:text.rfind(",", 0, MAX_ADDRESS_TEXT) + 1 or MAX_ADDRESS_TEXT]
            found = header_addresses(decode_words(text)) if text else []
            self._addresses[key] = [{"Name": display, "Address": address} for display, address in found
                                    if address or display]
        return [dict(entry) for entry in self._addresses[key]]

    def sender(self) -> dict[str, str]:
        found = self.addresses("From")
        if found:
            return found[0]
        return {"Name": self.header("From"), "Address": ""}

    @property
    def message_id(self) -> str:
        return self.header("Message-ID").strip().strip("<>")

    @property
    def subject(self) -> str:
        return self.header("Subject")

    def date(self) -> datetime | None:
        value = self.header("Date")
        try:
            return email.utils.parsedate_to_datetime(value) if value else None
        except (TypeError, ValueError, IndexError):
            return None

    @cached_property
    def _bodies(self) -> tuple[str, str]:
        """(Text, HTML) before an HTML-only message's Text is made from its HTML."""
        root = self.root
        if not root.multipart:
            if root.content_type == "text/html" and root.disposition != "attachment":
                return "", root.text()
            if self._binary_root():
                return "", ""
            return root.text(), ""

        def plain(p: Part) -> bool:
            return p.content_type == "text/plain" and p.disposition != "attachment"

        if root.content_type == "multipart/alternative":
            first = next((p for p in _breadth(root) if plain(p)), None)
            text = first.text() if first else ""
        else:
            text = "\n--\n".join(p.text() for p in _depth(root) if plain(p))
        html_part = next((p for p in _depth(root)
                          if p.content_type == "text/html" and p.disposition != "attachment"), None)
        return text, html_part.text() if html_part else ""

    @property
    def html(self) -> str:
        return self._bodies[1]

    @property
    def bodies(self) -> tuple[str, str]:
        """(Text, HTML) as Mailpit gives them: the one message shown reads its HTML
        within its own budget, whatever the request's (catch/text.py)."""
        text, html = self._bodies
        return (text or self.html_text() or "") if html else text, html

    def html_text(self, *, shared: bool = False) -> str | None:
        """``html_to_text`` of this message's HTML, kept once read (hostile HTML costs
        its budget once); None when *shared* and the request's budget ran out first."""
        if self._decoded.get("\0html") is None:
            text = html_to_text(self.html, shared=shared)
            if text is None:
                return None
            self._decoded["\0html"] = text
        return self._decoded["\0html"]

    def _binary_root(self) -> bool:
        root = self.root
        return root.disposition == "attachment" or not root.content_type.startswith("text/")

    @cached_property
    def parts(self) -> tuple[list[Part], list[Part]]:
        """(Attachments, Inline) before Mailpit's file name / Content-ID filter."""
        root = self.root
        if not root.multipart:
            if self._binary_root():
                return ([], [root]) if root.disposition == "inline" else ([root], [])
            return [], []
        everything = _breadth(root)
        attachments = [p for p in everything if not p.multipart
                       and (p.disposition == "attachment" or p.content_type == OCTET_STREAM)]
        inline = [p for p in everything if p.disposition == "inline" and not p.multipart]
        other = [p for p in everything if not p.multipart and not p.disposition and p.content_type != OCTET_STREAM
                 and p.content_type not in ("text/plain", "text/html")]
        return attachments, inline + other

    def listed(self) -> tuple[list[Part], list[Part]]:
        """(Attachments, Inline) as the API lists them: named or with a Content-ID."""
        attachments, inline = self.parts
        return ([p for p in attachments if p.filename or p.content_id],
                [p for p in inline if p.filename or p.content_id])

    def part(self, part_id: str) -> Part | None:
        return next((p for p in _breadth(self.root) if p.part_id == part_id and not p.multipart), None)

    def search_text(self) -> str | None:
        """What a plain search word is looked for in (Mailpit's SearchText); None
        while the request's budget leaves the HTML unread (a later request reads it)."""
        if self._decoded.get("\0search") is None:
            text, html = self._bodies
            body = self.html_text(shared=True) if html else text
            if body is None:
                return None
            pieces = [self.header(name) for name in ("From", "Subject", "To", "Cc", "Bcc", "Reply-To", "Return-Path")]
            pieces += [body] + [p.filename for p in self.parts[0]]
            self._decoded["\0search"] = clean(" ".join(pieces))
        return self._decoded["\0search"]

    @property
    def snippet(self) -> str:
        """Mailpit's Snippet; empty while the request's budget leaves the HTML unread."""
        if self._decoded.get("\0snippet") is None:
            text, html = self._bodies
            source = self.html_text(shared=True) if html.strip() else text
            if source is None:
                return ""
            flat = " ".join(source.replace("\ufeff", " ").split())
            self._decoded["\0snippet"] = flat if len(flat) <= 200 else flat[:200] + "..."
        return self._decoded["\0snippet"]


def clean(value: str) -> str:
    """Mailpit's cleanString: punctuation that separates words becomes space,
    white space collapsed, lower case."""
    value = re.sub(r"(\r?\n|\t|>|<|\"|,|;|\(|\))", " ", value.replace("\ufeff", " "))
    return " ".join(value.split()).lower()
