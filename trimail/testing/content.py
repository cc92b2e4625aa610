"""A captured message (``CapturedMessage``) and what a test asks of its
content: text, HTML, attachments, links, a one-time code, the header fields, an
.eml file.

``MessageContent`` is mixed into ``CapturedMessage``: nothing is parsed when a
message is captured; the first question parses the raw bytes once (the stdlib
``email`` package, ``email.policy.default``) and every answer is cached on the
message.

Security notes: the content is whatever the application under test sent.
``links`` costs time linear in the text and HTML: the hrefs are found by a
scanner of our own (``_hrefs``), not by html.parser, which rescans unfinished
markup (``extract`` costs what the test's own pattern costs).
"""

from __future__ import annotations

import dataclasses
import email
import email.header
import email.headerregistry
import email.message
import email.policy
import html
import operator
import re
from collections.abc import Iterator, Mapping
from functools import cached_property
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


# The markup of HTML that can hold or hide an href, split as a browser splits it
# (WHATWG HTML 13.2.5, simplified): a comment; any other <!...>, <?...> or end tag
# (skipped); a start tag: its name, its attributes, and its ">" (empty when the input
# ends inside the tag: a browser drops that tag).  What is left open runs to the end of
# the input, and the quantifiers are possessive, so a match never fails once it has
# begun and never gives characters back: every character is scanned once.  Python's
# html.parser rescans an unfinished construct from its start at every "<" of it:
# "<a " * 33,000 (100 kB) took 115 s, "<!--" * 100,000 (400 kB) 106 s.
_MARKUP = re.compile(r"""
      <!--.*?(?:-->|\Z)
    | <[!?/][^>]*+>?
    | <(?P<name>[a-zA-Z][^\s/>]*+)
       (?P<attributes>(?:[\s/]++|[^\s/>][^\s/>=]*+(?:\s*+=\s*+(?:"[^"]*+"?|'[^']*+'?|[^\s>]*+))?)*+)
       (?P<closed>>?)
    """, re.DOTALL | re.VERBOSE)
# one attribute of a start tag, by the rules of the attributes group above
_ATTRIBUTE = re.compile(r"""(?P<name>[^\s/>][^\s/>=]*+)(?:\s*+=\s*+(?P<value>"[^"]*+"?|'[^']*+'?|[^\s>]*+))?""")
# script and style hold text, not markup, up to their end tag (or the end of the input)
_RAW_TEXT_END = {name: re.compile(rf"</{name}(?=[\s/>])|\Z", re.IGNORECASE) for name in ("script", "style")}


def _hrefs(page: str) -> Iterator[str]:
    """The href attributes of *page*'s start tags, unescaped and stripped, in order;
    empty ones and #fragments left out.  Linear in the length of *page*: the HTML of a
    captured message is whatever the application under test produced."""
    pos = 0
    while (markup := _MARKUP.search(page, pos)) is not None:
        pos = markup.end()
        name = markup.group("name")
        if name is None:  # a comment, declaration, processing instruction or end tag
            continue
        if not markup.group("closed"):  # the input ends inside this tag
            return
        for attribute in _ATTRIBUTE.finditer(markup.group("attributes")):
            value = attribute.group("value")
            if attribute.group("name").lower() != "href" or value is None:
                continue
            if value[:1] in ('"', "'"):
                value = value[1:-1]
            value = html.unescape(value).strip()
            if value and not value.startswith("#"):
                yield value
        if name.lower() in _RAW_TEXT_END:
            pos = _RAW_TEXT_END[name.lower()].search(page, pos).start()


def _decoded(part: email.message.EmailMessage) -> str:
    """A text body as a Python string: charset and transfer encoding undone, and
    the wire's CRLF line ends as newlines.  A body that names no charset but is
    8-bit UTF-8 (what an application that writes UTF-8 without saying so sends, and
    what SMTPUTF8 and 8BITMIME carry) is read as UTF-8, not as ASCII with U+FFFD
    for every byte: the catcher (catch/mime.py) and Mailpit read it so too."""
    if part.get_param("charset") is None:
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes) and not payload.isascii():
            try:
                return payload.decode("utf-8").replace("\r\n", "\n")
            except UnicodeDecodeError:
                pass
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


_SURROGATE = re.compile("[\ud800-\udfff]")


class _Unparsed(email.headerregistry.UnstructuredHeader):
    """A field the stdlib's parser raised on, as text, with what its structured
    classes offer read from the text: enough for ``EmailMessage``'s own methods
    (``is_attachment``, ``get_body``, ``iter_attachments``)."""

    @property
    def content_disposition(self) -> str | None:
        return str(self).split(";")[0].strip().lower() or None

    @property
    def content_type(self) -> str:
        value = str(self).split(";")[0].strip().lower()
        return value if value.count("/") == 1 else "text/plain"

    @property
    def maintype(self) -> str:
        return self.content_type.partition("/")[0]

    @property
    def subtype(self) -> str:
        return self.content_type.partition("/")[2]

    params: Mapping[str, str] = {}
    addresses: tuple[email.headerregistry.Address, ...] = ()
    groups: tuple[email.headerregistry.Group, ...] = ()


_UNSTRUCTURED = email.headerregistry.HeaderRegistry(default_class=_Unparsed, use_default_map=False)


class _Lenient(email.policy.EmailPolicy):
    """``email.policy.default``, except that a header field its parser raises on is
    read as unstructured text (encoded words decoded, undecodable characters as
    U+FFFD).  Python 3.11's parser raises on ``To: a@[`` (AttributeError),
    ``Message-ID: <<>>`` (IndexError) and on an encoded word or RFC 2231 parameter
    in UTF-7 that decodes to a lone surrogate (UnicodeEncodeError, also from
    ``text``, ``html`` and ``attachments`` through Content-Disposition): the mail
    is whatever the application under test sent, and no question about it may
    raise into the test."""

    def header_fetch_parse(self, name, value):  # type: ignore[no-untyped-def]
        try:
            return super().header_fetch_parse(name, value)
        except Exception:  # noqa: BLE001 - any bug of the stdlib parser on odd input, see above
            try:
                text = str(email.header.make_header(email.header.decode_header(value)))
            except Exception:  # noqa: BLE001
                text = value
            text = _SURROGATE.sub("\ufffd", text).replace("=?", "=\ufffd?")  # decoded once, never again
            return _UNSTRUCTURED(name, text)


LENIENT = _Lenient()


class MessageContent:
    """The content helpers; needs ``raw`` (the message bytes) and ``queue_id``."""

    raw: bytes
    queue_id: str

    @cached_property
    def message(self) -> email.message.EmailMessage:
        """The parsed message (``email.policy.default``, lenient: ``_Lenient``), parsed once."""
        return email.message_from_bytes(self.raw, policy=LENIENT)  # type: ignore[return-value]

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
        found = dict.fromkeys(match.group(0).rstrip(_TRAILING) for match in _URL.finditer(self.text))
        found.update(dict.fromkeys(_hrefs(self.html)))  # a dict, not a list: "not in" was quadratic
        return list(found)

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


_accepted_fields = operator.attrgetter(*(field.name for field in dataclasses.fields(AcceptedMessage)))


class CapturedMessage(AcceptedMessage, MessageContent):
    """One accepted message: envelope (``sender``, ``recipients``, ``params``),
    session facts (``client_address``, ``helo``, ``protocol``, ``tls``, ``auth``)
    and the content (``raw`` bytes; ``message``, ``headers``, ``text``, ``html``,
    ``attachments``, ``links``, ``extract()``, ``save()``: see content.py)."""

    @classmethod
    def of(cls, accepted: AcceptedMessage) -> CapturedMessage:
        return cls(*_accepted_fields(accepted))

    @property
    def auth(self) -> str | None:
        return self.sasl_username or None

    def __str__(self) -> str:
        return f"from=<{self.sender}> to={','.join(f'<{r}>' for r in self.recipients)} subject={self.subject!r}"
