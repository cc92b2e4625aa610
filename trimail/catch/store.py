"""The catcher's mailbox: captured messages in memory, newest first, at most
``max_messages`` (the oldest is dropped to make room, as Mailpit's ``--max`` does),
each with Mailpit's ID, read flag and summary; Mailpit's search filters.

Bounded: the count is bounded by ``max_messages`` and each message by the
listener's ``message_size_limit``.  Everything runs on the catcher's one trio
thread, so there is no locking.
"""

from __future__ import annotations

import dataclasses
import email.utils
import json
import re
import secrets
import time
from collections import OrderedDict
from datetime import UTC, datetime

from trimail.catch.mime import MessageView, clean, created_time

# Mailpit's IDs are short UUIDs in this alphabet; ours are random in the same shape
ALPHABET = "23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
ID_LENGTH = 22
_ID = re.compile(f"^[{ALPHABET}]{{{ID_LENGTH}}}$")


def new_id() -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(ID_LENGTH))


def valid_id(value: str) -> bool:
    return bool(_ID.match(value))


@dataclasses.dataclass(slots=True)
class Stored:
    id: str
    created: datetime
    view: MessageView
    username: str = ""
    read: bool = False

    @property
    def raw(self) -> bytes:
        return self.view.raw

    def summary(self) -> dict[str, object]:
        """Mailpit's MessageSummary."""
        view = self.view
        return {"ID": self.id, "MessageID": view.message_id, "Read": self.read, "From": view.sender(),
                "To": view.addresses("To"), "Cc": view.addresses("Cc"), "Bcc": view.addresses("Bcc"),
                "ReplyTo": view.addresses("Reply-To"), "Subject": view.subject,
                "Created": created_time(self.created), "Username": self.username, "Tags": [],
                "Size": len(view.raw), "Attachments": len(view.parts[0]), "Snippet": view.snippet}


def with_envelope(raw: bytes, sender: str, recipients: list[str]) -> bytes:
    """What Mailpit stores: ``Return-Path`` set to the envelope sender when it
    differs, and recipients named in no address header added in ``Bcc``."""
    view = MessageView(raw)
    added: list[bytes] = []
    current = view.header("Return-Path").strip().strip("<>")
    if current != sender:
        raw = _without_field(raw, b"return-path")
        added.append(f"Return-Path: <{sender}>\r\n".encode())
    named = {a["Address"].lower() for field in ("To", "Cc", "Bcc") for a in view.addresses(field)}
    missing = [r for r in recipients if r.lower() not in named]
    if missing:
        existing = view.header("Bcc")
        value = ", ".join(([existing] if existing else []) + missing)
        raw = _without_field(raw, b"bcc")
        added.append(f"Bcc: {value}\r\n".encode())
    return b"".join(added) + raw


def _without_field(raw: bytes, name: bytes) -> bytes:
    """*raw* without the header fields called *name* (lower case), continuations included."""
    end = raw.find(b"\r\n\r\n")
    if end == -1:
        end = len(raw)
    head, rest = raw[:end + 2], raw[end + 2:]
    kept: list[bytes] = []
    dropping = False
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        dropping = line.split(b":", 1)[0].strip().lower() == name
        if not dropping:
            kept.append(line)
    return b"".join(kept) + rest


class Mailbox:
    def __init__(self, max_messages: int = 500) -> None:
        self.max_messages = max_messages
        self._messages: OrderedDict[str, Stored] = OrderedDict()  # oldest first
        self.started = time.monotonic()
        self.deleted = 0
        self.accepted = 0
        self.accepted_size = 0
        self.rejected = 0

    def add(self, raw: bytes, *, sender: str, recipients: list[str], username: str = "") -> Stored:
        raw = with_envelope(raw, sender, recipients)
        view = MessageView(raw)
        if not view.message_id:  # Mailpit gives every message a Message-ID
            raw = f"Message-ID: <{new_id()}@mailpit>\r\n".encode() + raw
        return self.add_raw(raw, username=username)

    def add_raw(self, raw: bytes, *, username: str = "") -> Stored:
        """Store *raw* as it is, dropping the oldest message beyond ``max_messages``."""
        stored = Stored(new_id(), datetime.now(UTC), MessageView(raw), username)
        self._messages[stored.id] = stored
        self.accepted += 1
        self.accepted_size += len(raw)
        while self.max_messages > 0 and len(self._messages) > self.max_messages:
            self._messages.popitem(last=False)
            self.deleted += 1
        return stored

    def newest_first(self) -> list[Stored]:
        return list(reversed(self._messages.values()))

    def get(self, message_id: str) -> Stored | None:
        return self._messages.get(message_id)

    @property
    def total(self) -> int:
        return len(self._messages)

    @property
    def unread(self) -> int:
        return sum(1 for m in self._messages.values() if not m.read)

    def delete(self, ids: list[str] | None) -> None:
        """Delete these messages (unknown IDs are ignored), or all when *ids* is None."""
        if ids is None:
            self.deleted += len(self._messages)
            self._messages.clear()
            return
        for message_id in ids:
            if self._messages.pop(message_id, None) is not None:
                self.deleted += 1

    def search(self, query: str, *, first: bool = False) -> tuple[list[Stored], int]:
        """The messages matching every term of *query*, newest first, and how many
        messages it could not tell: a plain word needs a message's text, and HTML is
        read into text within the request's budget (catch/text.py; a later search
        reads the rest).  With *first*, it stops at the first message it finds or
        cannot tell.  SearchError beyond ``MAX_TERMS`` distinct terms: each term
        is looked for in each message on the catcher's one thread, and 8,000 terms in
        one 16 KiB query stopped HTTP and SMTP for 20 s with 500 small messages
        (dropping terms instead would make a DELETE of a search delete more than it says)."""
        terms = list(dict.fromkeys(arguments(query)))
        if len(terms) > MAX_TERMS:
            raise SearchError(f"Error: too many search terms ({len(terms)}, at most {MAX_TERMS})")
        found, untold = [], 0
        for message in self.newest_first():
            verdict = _all(message, terms)
            if verdict:
                found.append(message)
            untold += verdict is None
            if first and verdict is not False:
                break
        return found, untold


MAX_TERMS = 50  # distinct words of one search query (a real one has a few)


class SearchError(ValueError):
    """A query the catcher will not run (the API answers 400 with this text)."""


def arguments(query: str) -> list[str]:
    """Mailpit's query words: split on spaces outside double quotes, quotes removed."""
    words, current, quoted = [], [], False
    for char in query:
        if char == '"':
            quoted = not quoted
        elif char == " " and not quoted:
            words.append("".join(current))
            current = []
            continue
        current.append(char)
    words.append("".join(current))
    return [w.replace('"', "").strip() for w in words if w.replace('"', "").strip()]


_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmg]?)b?$", re.IGNORECASE)


def _size(value: str) -> int:
    m = _SIZE.match(value.strip())
    if not m:
        return 0
    size = float(m.group(1)) * {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}[m.group(2).lower()]
    return int(min(size, 2.0 ** 62))  # "larger:999...9" (400 digits) is inf as a float: no message is larger


def _json(addresses: object) -> str:
    return json.dumps(addresses).lower()


def _all(message: Stored, terms: list[str]) -> bool | None:
    """Every term matches; None when none fails but a word needs text still unread.
    The terms needing no text are tried first: a message they rule out costs no HTML."""
    first = [(term, matches(message, term, text=False)) for term in terms]
    if any(verdict is False for _, verdict in first):
        return False
    later = [matches(message, term) for term, verdict in first if verdict is None]
    if False in later:
        return False
    return None if None in later else True


def matches(message: Stored, term: str, *, text: bool = True) -> bool | None:
    """One of Mailpit's search filters (``to:``, ``from:``, ``subject:``, ``is:unread``,
    ``has:attachment``, ... , ``-`` or ``!`` in front to exclude), or a word looked
    for in the addresses, subject and text (None while the text is unread, or
    without *text*).  Matching ignores case, as SQLite's LIKE."""
    exclude = len(term) > 1 and term[0] in "-!"
    if exclude:
        term = term[1:]
    lower, view = term.lower(), message.view
    fields = {"to:": "To", "from:": "From", "cc:": "Cc", "bcc:": "Bcc", "reply-to:": "Reply-To"}
    result: bool | None = None
    for prefix, header in fields.items():
        if lower.startswith(prefix):
            wanted = clean(term[len(prefix):])
            if not wanted:
                return True
            found = view.sender() if header == "From" else view.addresses(header)
            result = wanted in _json(found)
            break
    else:
        if lower.startswith("addressed:"):
            wanted = clean(term[10:])
            if not wanted:
                return True
            result = any(wanted in _json(view.addresses(h)) for h in fields.values())
        elif lower.startswith("subject:"):
            if not term[8:]:
                return True
            result = term[8:].lower() in view.subject.lower()
        elif lower.startswith("message-id:"):
            wanted = clean(term[11:])
            result = wanted in view.message_id.lower()
        elif lower in ("is:read", "is:unread"):
            result = message.read == (lower == "is:read")
        elif lower in ("has:attachment", "has:attachments"):
            result = bool(view.parts[0])
        elif lower in ("has:inline", "has:inlines"):
            result = bool(view.parts[1])
        elif lower.startswith(("larger:", "smaller:")) and _size(term.split(":", 1)[1]):
            limit = _size(term.split(":", 1)[1])
            result = len(view.raw) > limit if lower.startswith("larger:") else len(view.raw) < limit
        elif lower.startswith(("after:", "before:")):
            moment = _when(term.split(":", 1)[1])
            if moment is None:
                return True  # Mailpit ignores a date it cannot read
            result = message.created >= moment if lower.startswith("after:") else message.created <= moment
        else:
            searched = view.search_text() if text else None
            if searched is None:
                return None
            result = clean(term) in searched
    return result != exclude


def _when(value: str) -> datetime | None:
    value = value.strip()
    for form in ("%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"):
        try:
            return datetime.strptime(value, form).replace(tzinfo=UTC)
        except ValueError:
            continue
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    # no zone, or "-0000": naive, and comparing it with an aware Created raised TypeError
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment
