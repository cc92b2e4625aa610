"""The queue's reads: message counts, the listings behind ``mailq`` and ``trimail
queue list/show``, and a message's content.

``QueueReads`` is the reading half of ``store.Store`` (a mixin on its connection);
``list_messages`` runs in one read snapshot, so it sees one consistent state of the
queue; ``iter_messages`` (``trimail queue list``, mailq) reads a page at a time, each
message whole, and holds no snapshot between pages.
``MessageInfo`` and ``RecipientInfo`` are what the listings return, with the JSON
the CLI prints (times as RFC 3339, ``rfc3339``).

Security notes: read-only SQL with bound parameters; a message's content comes
back as bytes for the caller to print or deliver, never interpreted here.

Parameters: none.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import apsw

LIST_PAGE = 2000  # recipients a listing reads in one snapshot (and holds in memory), and the last message's rest
_PAGE = ("SELECT m.id, m.state, m.sender, m.arrival_time, m.size, r.address, r.status, r.attempts, r.next_attempt,"
         " r.last_reply, r.seq FROM recipient AS r JOIN message AS m ON m.id = r.message_id")


@dataclasses.dataclass(slots=True)
class RecipientInfo:
    address: str
    status: str
    attempts: int
    next_attempt: float | None
    last_reply: str | None

    def to_json(self) -> dict[str, object]:
        return {
            "address": self.address,
            "status": self.status,
            "attempts": self.attempts,
            "next_attempt": rfc3339(self.next_attempt),
            "last_reply": self.last_reply,
        }


@dataclasses.dataclass(slots=True)
class MessageInfo:
    id: str
    state: str
    sender: str
    arrival_time: float
    size: int
    recipients: list[RecipientInfo]

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "state": self.state,
            "sender": self.sender,
            "arrival_time": rfc3339(self.arrival_time),
            "size": self.size,
            "recipients": [r.to_json() for r in self.recipients],
        }


def _not_done(message: MessageInfo) -> bool:
    return any(r.status in ("pending", "deferred") for r in message.recipients)


def filtered(messages: Iterable[MessageInfo], state: str | None = None, sender: str | None = None,
             recipient: str | None = None, domain: str | None = None) -> Iterator[MessageInfo]:
    """The messages in *state*, from *sender*, or with *recipient* or a recipient in
    *domain* among those not yet done (``trimail queue list``'s filters)."""
    def keep(m: MessageInfo) -> bool:
        if state and m.state != state:
            return False
        if sender is not None and m.sender.lower() != sender.lower():
            return False
        pending = [r.address.lower() for r in m.recipients if r.status in ("pending", "deferred")]
        if recipient and recipient.lower() not in pending:
            return False
        return not (domain and not any(a.rpartition("@")[2] == domain.lower() for a in pending))

    return (m for m in messages if keep(m))


def rfc3339(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


class QueueReads:
    """Reads on ``self.db``: ``store.Store`` mixes this into ``database.Database``,
    whose ``read_snapshot`` they run in."""

    db: apsw.Connection

    if TYPE_CHECKING:
        def read_snapshot(self) -> AbstractContextManager[None]: ...

    def counts(self) -> dict[str, int]:
        """Messages per state (states with none left out), from the counts the
        triggers keep: five rows read, however long the queue."""
        rows = self.db.execute("SELECT state, messages FROM queue_count WHERE messages != 0")
        return {state: count for state, count in rows}

    def oldest_arrival(self) -> float | None:
        """The oldest message's arrival time (one step down the ``message_arrival`` index)."""
        return self.db.execute("SELECT min(arrival_time) FROM message").fetchone()[0]

    def gauges(self) -> tuple[dict[str, int], float | None]:
        """What the queue gauges show (``Metrics.set_queue``): ``counts`` and ``oldest_arrival``."""
        return self.counts(), self.oldest_arrival()

    def iter_messages(self, page: int = LIST_PAGE) -> Iterator[MessageInfo]:
        """Like list_messages(), but streamed in queue-ID order, *page* recipients at a
        time (and the rest of the page's last message: each is read whole in one
        instant, red team 33d), so the first message comes out at once however long the
        queue is and memory does not grow with it.  Each page is read in a snapshot of its own that
        ends before anything is yielded: a reader that stops reading (``mailq | less``
        left open) holds no snapshot, and the WAL goes on being checkpointed (red team
        33b: it grew to 410 MB behind one).  The listing is therefore one instant per
        page, as Postfix's showq walks its queue directories while they change."""
        after = ""  # the last message listed
        while True:
            with self.read_snapshot():
                rows = self.db.execute(_PAGE + " WHERE r.message_id > ? ORDER BY r.message_id, r.seq LIMIT ?",
                                       (after, page)).fetchall()
                if len(rows) == page:  # the last message may go on: the rest of it, in the same instant
                    rows += self.db.execute(_PAGE + " WHERE r.message_id = ? AND r.seq > ? ORDER BY r.seq",
                                            (rows[-1][0], rows[-1][-1])).fetchall()
            current: MessageInfo | None = None
            for message_id, state, sender, arrival, size, *recipient, _ in rows:
                if current is None or current.id != message_id:
                    if current is not None and _not_done(current):
                        yield current
                    current = MessageInfo(message_id, state, sender, arrival, size, recipients=[])
                current.recipients.append(RecipientInfo(*recipient))
            if current is not None and _not_done(current):
                yield current
            if len(rows) < page:
                return
            after = rows[-1][0]

    def list_messages(self) -> list[MessageInfo]:
        """Queued messages with at least one recipient not yet done, oldest first."""
        messages: dict[str, MessageInfo] = {}
        with self.read_snapshot():
            for row in self.db.execute(
                "SELECT id, state, sender, arrival_time, size FROM message ORDER BY id"
            ):
                messages[row[0]] = MessageInfo(*row, recipients=[])
            for message_id, *fields in self.db.execute(
                "SELECT message_id, address, status, attempts, next_attempt, last_reply"
                " FROM recipient ORDER BY message_id, seq"
            ):
                info = messages.get(message_id)
                if info is not None:
                    info.recipients.append(RecipientInfo(*fields))
        return [m for m in messages.values()
                if any(r.status in ("pending", "deferred") for r in m.recipients)]

    def get_message(self, queue_id: str) -> MessageInfo | None:
        for info in self.list_messages_by_id([queue_id]):
            return info
        return None

    def list_messages_by_id(self, ids: list[str]) -> list[MessageInfo]:
        found = []
        with self.read_snapshot():
            for queue_id in ids:
                row = self.db.execute(
                    "SELECT id, state, sender, arrival_time, size FROM message WHERE id = ?", (queue_id,)
                ).fetchone()
                if row is None:
                    continue
                recipients = [RecipientInfo(*r) for r in self.db.execute(
                    "SELECT address, status, attempts, next_attempt, last_reply FROM recipient"
                    " WHERE message_id = +? ORDER BY seq", (queue_id,))]  # +?: see queue/transitions.py
                found.append(MessageInfo(*row, recipients=recipients))
        return found

    def read_content(self, queue_id: str) -> bytes | None:
        row = self.db.execute("SELECT content FROM body WHERE message_id = ?", (queue_id,)).fetchone()
        return None if row is None else bytes(row[0])
