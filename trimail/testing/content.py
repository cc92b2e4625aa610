"""A captured message (``CapturedMessage``) and what a test asks of its
content: text, HTML, attachments, links, a one-time code, the header fields, an
.eml file.

``MessageContent`` is mixed into ``CapturedMessage``: nothing is parsed when a
message is captured; the first question parses the raw bytes once (the stdlib
``email`` package, ``email.policy.default``) and every answer is cached on the
message.
"""

from __future__ import annotations

import dataclasses
import email
import email.message
import email.policy
import re
from collections.abc import Iterator, Mapping
from functools import cached_property
from html.parser import HTMLParser
from pathlib import Path

from trimail.receive.hooks import AcceptedMessage

# http(s) URLs in plain text; trailing punctuation of the sentence is not part of the URL
_URL = re.compile(r"https?://[^\s<>\"'\]\[{}|\\^`]+", re.IGNORECASE)
_TRAILING = ".,;:!?)"


@dataclasses.dataclass(frozen=True, slots=True)
class Attachment:
    """One part of a message that is neither its text nor its HTML body."""

    filename: str | None
    content_type: str
    data: bytes

    def __repr__(self) -> str:
        return f"Attachment(filename={self.filename!r}, content_type={self.content_type!r}, {len(self.data)} bytes)"


class Headers(Mapping[str, str]):
    """A read-only, case-insensitive view of the header fields.

    ``headers["Subject"]`` is the first field of that name (decoded; address
    fields have ``.addresses``), ``headers.get_all("Received")`` every one in
    order, ``headers.fields()`` every (name, value) pair as it appears.
    """

    def __init__(self, message: email.message.EmailMessage) -> None:
        self._message = message

    def __getitem__(self, name: str) -> str:
        value = self._message.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def get_all(self, name: str) -> list[str]:
        return list(self._message.get_all(name) or [])

    def fields(self) -> list[tuple[str, str]]:
        return list(self._message.items())

    def __iter__(self) -> Iterator[str]:
        seen: set[str] = set()
        for name in self._message:
            if name.lower() not in seen:
                seen.add(name.lower())
                yield name

    def __len__(self) -> int:
        return len({name.lower() for name in self._message})

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._message

    def __repr__(self) -> str:
        return f"Headers({self.fields()!r})"


class _Hrefs(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name == "href" and value and value.strip() and not value.strip().startswith("#"):
                self.hrefs.append(value.strip())


def _decoded(part: email.message.EmailMessage) -> str:
    """A text body as a Python string: charset and transfer encoding undone, and
    the wire's CRLF line ends as newlines."""
    try:
        content = part.get_content()
    except (LookupError, KeyError, ValueError):  # an unknown or lying charset: show what is there
        payload = part.get_payload(decode=True)
        content = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else str(payload)
    return content.replace("\r\n", "\n")


def _leaves(part: email.message.EmailMessage) -> Iterator[email.message.EmailMessage]:
    """Every non-multipart part, depth first; a message/rfc822 part is one leaf."""
    if part.is_multipart() and part.get_content_maintype() == "multipart":
        for child in part.iter_parts():
            yield from _leaves(child)  # type: ignore[arg-type]
    else:
        yield part


def _data(part: email.message.EmailMessage) -> bytes:
    if part.get_content_maintype() == "message" and part.is_multipart():
        inner = part.get_payload(0)
        return inner.as_bytes(policy=email.policy.SMTP) if isinstance(inner, email.message.Message) else b""
    payload = part.get_payload(decode=True)
    return payload if isinstance(payload, bytes) else b""


class MessageContent:
    """The content helpers; needs ``raw`` (the message bytes) and ``queue_id``."""

    raw: bytes
    queue_id: str

    @cached_property
    def message(self) -> email.message.EmailMessage:
        """The parsed message (``email.policy.default``), parsed once."""
        return email.message_from_bytes(self.raw, policy=email.policy.default)  # type: ignore[return-value]

    @cached_property
    def headers(self) -> Headers:
        return Headers(self.message)

    @property
    def subject(self) -> str:
        return str(self.message.get("Subject", ""))

    @cached_property
    def _bodies(self) -> tuple[email.message.EmailMessage | None, email.message.EmailMessage | None]:
        message = self.message
        plain = message.get_body(preferencelist=("plain",))
        html = message.get_body(preferencelist=("html",))
        return plain, html  # type: ignore[return-value]

    @cached_property
    def text(self) -> str:
        """The text/plain body, decoded ("" when the message has none)."""
        plain = self._bodies[0]
        return _decoded(plain) if plain is not None else ""

    @cached_property
    def html(self) -> str:
        """The text/html body, decoded ("" when the message has none)."""
        html = self._bodies[1]
        return _decoded(html) if html is not None else ""

    @cached_property
    def attachments(self) -> list[Attachment]:
        """Every leaf part other than the text and HTML bodies, in order."""
        bodies = [part for part in self._bodies if part is not None]
        return [Attachment(part.get_filename(), part.get_content_type(), _data(part))
                for part in _leaves(self.message) if not any(part is body for body in bodies)]

    @cached_property
    def links(self) -> list[str]:
        """URLs in the text (http and https) then the HTML's hrefs, each once, in order."""
        found: list[str] = []
        for match in _URL.finditer(self.text):
            url = match.group(0).rstrip(_TRAILING)
            if url not in found:
                found.append(url)
        if self.html:
            parser = _Hrefs()
            parser.feed(self.html)
            parser.close()
            found += [href for href in dict.fromkeys(parser.hrefs) if href not in found]
        return found

    def extract(self, pattern: str | re.Pattern[str], flags: int = 0) -> str | None:
        """The first group (the whole match if there is no group) of the first match
        of *pattern* in the text, then in the HTML; None when nothing matches."""
        regex = re.compile(pattern, flags) if isinstance(pattern, str) else pattern
        for content in (self.text, self.html):
            match = regex.search(content)
            if match is not None:
                return match.group(1) if regex.groups else match.group(0)
        return None

    def save(self, path: str | Path) -> Path:
        """Write the raw bytes as an .eml file; a directory gets ``<queue id>.eml``."""
        target = Path(path)
        if target.is_dir():
            target = target / f"{self.queue_id}.eml"
        target.write_bytes(self.raw)
        return target


class CapturedMessage(AcceptedMessage, MessageContent):
    """One accepted message: envelope (``sender``, ``recipients``, ``params``),
    session facts (``client_address``, ``helo``, ``protocol``, ``tls``, ``auth``)
    and the content (``raw`` bytes; ``message``, ``headers``, ``text``, ``html``,
    ``attachments``, ``links``, ``extract()``, ``save()``: see content.py)."""

    @classmethod
    def of(cls, accepted: AcceptedMessage) -> CapturedMessage:
        return cls(*(getattr(accepted, field.name) for field in dataclasses.fields(accepted)))

    @property
    def auth(self) -> str | None:
        return self.sasl_username or None

    def __str__(self) -> str:
        return f"from=<{self.sender}> to={','.join(f'<{r}>' for r in self.recipients)} subject={self.subject!r}"
