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
import json
import time

from trimail.queue.database import Database, QueueError
from trimail.queue.reads import QueueReads
from trimail.queue.spool import Spool

BLOB_CHUNK = 1 << 20


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

    def insert_message(self, msg: NewMessage) -> None:
        """Insert envelope, recipients and content (call inside a transaction)."""
        db = self.db
        size = msg.content.size
        db.execute(
            "INSERT INTO message (id, state, sender, arrival_time, next_attempt, size, client_address,"
            " client_name, helo_name, protocol, params) VALUES (?, ?, ?, ?, NULL, ?, ?, ?, ?, ?, ?)",
            (msg.id, msg.state, msg.sender, msg.arrival_time, size, msg.client_address, msg.client_name,
             msg.helo_name, msg.protocol, json.dumps(msg.params)),
        )
        db.executemany(
            "INSERT INTO recipient (message_id, seq, address) VALUES (?, ?, ?)",
            [(msg.id, seq, address) for seq, address in enumerate(msg.recipients)],
        )
        in_memory = msg.content.getvalue()
        if in_memory is not None:
            db.execute("INSERT INTO body (message_id, content) VALUES (?, ?)", (msg.id, in_memory))
            return
        db.execute("INSERT INTO body (message_id, content) VALUES (?, zeroblob(?))", (msg.id, size))
        rowid = db.last_insert_rowid()
        with db.blob_open("main", "body", "content", rowid, True) as blob:
            for chunk in msg.content.chunks(BLOB_CHUNK):
                blob.write(chunk)

    def recover_active(self) -> int:
        """After a crash, messages left ``active`` go back to ``incoming`` (as qmgr does)."""
        self.db.execute("UPDATE message SET state = 'incoming' WHERE state = 'active'")
        return self.db.changes()

    def transition(self, queue_id: str, expected: str, new: str) -> None:
        self.db.execute("UPDATE message SET state = ? WHERE id = ? AND state = ?", (new, queue_id, expected))
        if self.db.changes() != 1:
            raise TransitionError(f"{queue_id}: not in state {expected}")
