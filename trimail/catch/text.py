"""Text from hostile input, in bounded time: RFC 2047 encoded words in a header
field (``decode_words``) and HTML down to text (``html_to_text``, the role of
enmime's html2text for an HTML-only message).  The catcher has one thread: the
stdlib's quadratic corners (``decode_header`` popping from the front of a list,
``HTMLParser`` rescanning to the end at each ``<`` it cannot close) would stop every
HTTP and SMTP client, so long values are decoded in pieces and HTML parsing has a
time budget: ``HTML_BUDGET`` for one message, and within ``shared_budget`` (one
HTTP request) at most that many seconds for all the messages it reads together.
Pure functions, no I/O.
"""

from __future__ import annotations

import email.header
import math
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from html.parser import HTMLParser

_SURROGATE = re.compile("[\ud800-\udfff]")


def no_surrogates(text: str) -> str:
    """*text* with each lone surrogate as U+FFFD.  UTF-7 (and the stdlib's
    surrogateescape for 8-bit header bytes) decodes to them, and a str holding one
    cannot be encoded as UTF-8: one such message made every list a 500."""
    return _SURROGATE.sub("\ufffd", text)


WORDS_PIECE = 4096  # characters decoded at a time: the stdlib decoder is quadratic in the words


def decode_words(value: str) -> str:
    """RFC 2047 encoded words decoded; anything undecodable kept as it is.
    ``email.header.decode_header`` pops from the front of a list (a 1.4 MB Subject
    of encoded words took 55 s on the catcher's one thread): a long value is decoded
    in pieces cut at white space."""
    pieces, start, size = [], 0, len(value)
    while start < size:
        end = size if size - start <= WORDS_PIECE else value.rfind(" ", start + 1, start + WORDS_PIECE)
        if end <= start:
            end = min(size, start + WORDS_PIECE)
        pieces.append(_decode_piece(value[start:end]))
        start = end
    return no_surrogates("".join(pieces))


def _decode_piece(value: str) -> str:
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except (LookupError, ValueError, UnicodeError):
        return value


HTML_BUDGET = 0.5  # seconds of parsing per message's HTML; hostile HTML is cut there
REQUEST_BUDGET = 1.0  # seconds of parsing for all the messages one HTTP request lists or searches

_shared_deadline: ContextVar[float] = ContextVar("trimail.catch.text.shared_deadline", default=math.inf)


@contextmanager
def shared_budget(seconds: float) -> Iterator[None]:
    """Inside, the ``html_to_text(..., shared=True)`` calls parse for *seconds* in all:
    500 messages of hostile HTML at ``HTML_BUDGET`` each held the catcher's one thread
    (and so every HTTP and SMTP client) for 250 s on the first listing that wanted them."""
    token = _shared_deadline.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _shared_deadline.reset(token)


class _OverBudget(Exception):
    pass


class _Text(HTMLParser):
    """HTML down to text for an HTML-only message (the role of enmime's html2text).
    The stdlib parser rescans to the end of its input at each ``<`` it cannot close
    (``<a<a<a...``: 400 KB took 500 s on Python 3.11.7, with the catcher's one thread
    and so every HTTP and SMTP client stopped): each event checks a deadline, and
    the text is what was read when it passes."""

    BLOCK = frozenset({"p", "div", "br", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6", "table", "ul", "ol", "hr"})

    def __init__(self, deadline: float) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip = 0
        self.deadline = deadline

    def _check(self) -> None:
        if time.monotonic() > self.deadline:
            raise _OverBudget

    def handle_comment(self, data: str) -> None:
        self._check()

    def handle_decl(self, decl: str) -> None:
        self._check()

    def handle_pi(self, data: str) -> None:
        self._check()

    def unknown_decl(self, data: str) -> None:
        self._check()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._check()
        if tag in ("script", "style", "head", "title"):
            self.skip += 1
        elif tag in self.BLOCK:
            self.out.append("\n")

    def handle_endtag(self, tag: str) -> None:
        self._check()
        if tag in ("script", "style", "head", "title"):
            self.skip = max(0, self.skip - 1)
        elif tag in self.BLOCK:
            self.out.append("\n")

    def handle_data(self, data: str) -> None:
        self._check()
        if not self.skip:
            self.out.append(re.sub(r"\s+", " ", data))


def html_to_text(html: str, *, shared: bool = False) -> str | None:
    """The text of *html*, what was read of it within ``HTML_BUDGET``.  With *shared*,
    None when the enclosing ``shared_budget`` ran out first: nothing is final then (the
    caller keeps nothing, and a later call with budget left reads it whole)."""
    own = time.monotonic() + HTML_BUDGET
    deadline = min(own, _shared_deadline.get()) if shared else own
    if deadline <= time.monotonic():
        return None
    parser = _Text(deadline)
    try:
        for start in range(0, len(html), 65536):  # in pieces: the deadline is checked between them too
            parser.feed(html[start:start + 65536])
            parser._check()
        parser.close()
    except _OverBudget:  # hostile HTML: keep what was read within its own budget
        if deadline < own:
            return None
    except (AssertionError, ValueError):  # HTMLParser on hostile input: keep what was read
        pass
    lines = [line.strip() for line in "".join(parser.out).splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
