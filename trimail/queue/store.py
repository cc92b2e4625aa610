"""The queue's writes: a new message in, a message's state moved, ``active`` recovered.

``Store`` is one connection to the queue database: ``database.Database`` (opening
it safely, transactions) with the reads of ``reads.QueueReads`` and the writes
here.  The qmgr's and the operator's transitions are functions on a ``Store`` in
``transitions.py`` and ``admin.py``.

Every transition is ``UPDATE ... WHERE id = ? AND state = ?`` with a row-count
check; rows are never dequeued by delete until all recipients are done.  No SQL is
built with string formatting.  A message's body goes in with incremental blob I/O,
``BLOB_CHUNK`` at a time, so a large message is never held in memory whole.

Security notes: nothing here takes a path from mail; envelope and content are
bound parameters.

Parameters: none.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time

from trimail.queue.database import Database, QueueError
from trimail.queue.reads import QueueReads
from trimail.queue.spool import Spool

BLOB_CHUNK = 1 << 20


_ROWS = 256  # rows per statement of insert_messages (11 values each: SQLite allows 32,766)
_MESSAGE_ROW = ("INSERT INTO message (id, state, sender, arrival_time, next_attempt, size, client_address,"
                " client_name, helo_name, protocol, params) VALUES ", "(?, ?, ?, ?, NULL, ?, ?, ?, ?, ?, ?)")
_BODY_ROW = ("INSERT INTO body (message_id, content) VALUES ", "(?, ?)")
_RECIPIENT_ROW = ("INSERT INTO recipient (message_id, seq, address) VALUES ", "(?, ?, ?)")
# A message's three kinds of rows from one row of a view (commit_messages): a TEMP
# view of this connection and its INSTEAD OF trigger, so nothing of it is in the
# database file; the recipients come as a JSON array (json_each: seq is its index)
_NEW_MESSAGE_VIEW = """
CREATE TEMP VIEW IF NOT EXISTS new_message (id, state, sender, arrival_time, size, client_address, client_name,
    helo_name, protocol, params, content, recipients)
    AS SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL WHERE 0;
CREATE TEMP TRIGGER IF NOT EXISTS new_message_rows INSTEAD OF INSERT ON new_message BEGIN
    INSERT INTO message (id, state, sender, arrival_time, next_attempt, size, client_address, client_name,
        helo_name, protocol, params)
        VALUES (NEW.id, NEW.state, NEW.sender, NEW.arrival_time, NULL, NEW.size, NEW.client_address,
                NEW.client_name, NEW.helo_name, NEW.protocol, NEW.params);
    INSERT INTO body (message_id, content) VALUES (NEW.id, NEW.content);
    INSERT INTO recipient (message_id, seq, address) SELECT NEW.id, key, value FROM json_each(NEW.recipients);
END;
"""
_NEW_MESSAGE_ROW = ("INSERT INTO temp.new_message VALUES ", "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
COMMIT_ROWS = _ROWS  # messages commit_messages takes (12 values each)


@functools.cache  # at most 4 x 256 texts, built once each: insert_message runs per message
def _insert_rows(statement: tuple[str, str], count: int) -> str:
    return statement[0] + ", ".join([statement[1]] * count)


def _message_values(msg: NewMessage) -> tuple:
    return (msg.id, msg.state, msg.sender, msg.arrival_time, msg.content.size, msg.client_address, msg.client_name,
            msg.helo_name, msg.protocol, json.dumps(msg.params))


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


class TransitionError(QueueError):
    """A state transition found the row in another state than expected."""


@dataclasses.dataclass(slots=True)
class NewMessage:
    """A message ready to be committed: envelope, content and client facts."""

    id: str
    sender: str
    recipients: list[str]
    content: Spool
    state: str = "incoming"
    arrival_time: float = dataclasses.field(default_factory=time.time)
    client_address: str = ""
    client_name: str = ""
    helo_name: str = ""
    protocol: str = ""
    params: dict[str, str | None] = dataclasses.field(default_factory=dict)


class Store(Database, QueueReads):
    """One connection to the queue database (not thread-safe: one thread each)."""

    _new_message_view = False  # this connection made the TEMP view commit_messages inserts into

    def insert_message(self, msg: NewMessage) -> None:
        """Insert envelope, recipients and content (call inside a transaction)."""
        db = self.db
        size = msg.content.size
        db.execute(_insert_rows(_MESSAGE_ROW, 1), _message_values(msg))
        db.executemany(_insert_rows(_RECIPIENT_ROW, 1),
                       [(msg.id, seq, address) for seq, address in enumerate(msg.recipients)])
        in_memory = msg.content.getvalue()
        if in_memory is not None:
            db.execute(_insert_rows(_BODY_ROW, 1), (msg.id, in_memory))
            return
        db.execute("INSERT INTO body (message_id, content) VALUES (?, zeroblob(?))", (msg.id, size))
        rowid = db.last_insert_rowid()
        with db.blob_open("main", "body", "content", rowid, True) as blob:
            for chunk in msg.content.chunks(BLOB_CHUNK):
                blob.write(chunk)

    def insert_messages(self, messages: list[NewMessage]) -> None:
        """Insert several messages whose content is in memory, with one statement per
        table (call inside a transaction): SQLite runs each statement without the
        interpreter lock, and the thread that runs them waits to get it back after
        every one while the event loop holds it: a batch of n messages waits three
        times, not five times n (``queue.batch._insert_together``)."""
        db = self.db
        for chunk in _chunks(messages, _ROWS):
            db.execute(_insert_rows(_MESSAGE_ROW, len(chunk)),
                       [value for msg in chunk for value in _message_values(msg)])
            db.execute(_insert_rows(_BODY_ROW, len(chunk)), [
                value for msg in chunk for value in (msg.id, msg.content.getvalue())])
        rows = [(msg.id, seq, address) for msg in messages for seq, address in enumerate(msg.recipients)]
        for chunk in _chunks(rows, _ROWS):
            db.execute(_insert_rows(_RECIPIENT_ROW, len(chunk)), [value for row in chunk for value in row])

    def commit_messages(self, messages: list[NewMessage]) -> None:
        """Insert and commit at most ``COMMIT_ROWS`` messages whose content is in
        memory, with one statement and outside any transaction: the statement is its
        own transaction (write lock through the busy handler as for ``BEGIN
        IMMEDIATE``, fsynced as ``set_durable`` says), all of it or, when it fails,
        none of it.  Running BEGIN, three INSERTs and COMMIT instead, the committing
        thread gave up the interpreter lock five times, and under load it waited for
        the event loop to give it back after each (``queue.batch._insert_together``)."""
        db = self.db
        if not self._new_message_view:
            db.execute(_NEW_MESSAGE_VIEW)
            self._new_message_view = True
        # ensure_ascii=False: what SQLite cannot take (a lone surrogate) fails to bind,
        # as it does for insert_message, instead of reaching the table as an escape
        db.execute(_insert_rows(_NEW_MESSAGE_ROW, len(messages)), [
            value for msg in messages for value in
            (*_message_values(msg), msg.content.getvalue(), json.dumps(msg.recipients, ensure_ascii=False))])

    def recover_active(self) -> int:
        """After a crash, messages left ``active`` go back to ``incoming`` (as qmgr does)."""
        self.db.execute("UPDATE message SET state = 'incoming' WHERE state = 'active'")
        return self.db.changes()

    def transition(self, queue_id: str, expected: str, new: str) -> None:
        self.db.execute("UPDATE message SET state = ? WHERE id = ? AND state = ?", (new, queue_id, expected))
        if self.db.changes() != 1:
            raise TransitionError(f"{queue_id}: not in state {expected}")
