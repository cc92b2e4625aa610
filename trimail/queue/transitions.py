"""The queue manager's transitions (its SQL): claim, promote, record, finish, read.

Functions take a ``Store`` and run inside the caller's transaction (the writer
thread's group commit in serve).  The operator's changes (flush, hold, release,
delete, requeue) are in ``queue/admin.py``.

Bound values that the query planner could look at are written ``+?``: SQLite
plans with the value of a bare ``?`` in ``LIMIT ?``, and in ``column = ?`` when
the ORDER BY could then be dropped, and then prepares the statement again every
time a new value is bound (measured: 5-20 µs per statement, on every claim and
finish).  ``+?`` is the same value to the statement and opaque to the planner,
and each statement still runs through the index its plan names.

Message states move ``incoming -> active`` and, when due, ``deferred -> active``
(claim: new mail and retries in turn, at most ``CLAIM_BATCH`` per request, each
through its index), ``maildrop -> incoming`` (promote, in bounded batches),
``active -> deferred`` or removal (finish), and ``* <-> hold`` by the operator.  Recipients
move ``pending/deferred -> sent | deferred | bounced`` per delivery attempt.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable

from trimail.cleanup.loglines import LOG_PARAM
from trimail.queue.store import Store, TransitionError

HEADER_BYTES = 64 * 1024

log = logging.getLogger("trimail.qmgr")


@dataclasses.dataclass(slots=True)
class QueuedRecipient:
    seq: int
    address: str
    attempts: int
    last_reply: str | None


@dataclasses.dataclass(slots=True)
class ClaimedMessage:
    id: str
    sender: str
    arrival_time: float
    active_time: float
    size: int
    params: dict[str, str | None]
    recipients: list[QueuedRecipient]
    content: bytes | None = None  # held in memory when handed over at acceptance (small messages)
    retry: bool = False  # tried before (a recipient has attempts): a retry, not new mail
    flushed: float | None = None  # when a flush last made it due (ETRN, queue flush): see scheduler/dead.py


@dataclasses.dataclass(slots=True)
class RecipientResult:
    seq: int
    status: str  # sent | deferred | bounced
    reply: str
    next_attempt: float | None = None
    owed: int = 0  # sent, and owed a success notice (NOTIFY=SUCCESS): the caller's code (> 1) for it, kept
    # in recipient.notified until the message's round ends (owed_notices)


@dataclasses.dataclass(slots=True)
class Finished:
    """What finish() decided: removed or deferred, and who bounced this round."""

    removed: bool
    next_attempt: float | None
    bounced: list[tuple[str, str]]  # (recipient address, last reply)


CLAIM_BATCH = 64  # most messages one claim (one writer request) moves to active
PROMOTE_BATCH = 256  # most maildrop rows one round moves to incoming
PICKUP_HOLD_PARAM = "hold_at_pickup"  # a maildrop message that goes to hold, not incoming (promote_maildrop)

_CLAIM_COLUMNS = ("SELECT id, sender, arrival_time, size, params, flushed,"
                  " (SELECT length(content) FROM body WHERE message_id = message.id) FROM message")


def promote_due(store: Store, now: float, limit: int = PROMOTE_BATCH) -> int:
    """Up to *limit* messages of the maildrop queue (local submissions: Postfix's
    pickup) go to incoming, and up to *limit* due deferred messages too (the
    operator's view of a queue run; the rounds themselves claim due deferred
    messages straight from the deferred queue, see claim()).  Bounded, so no
    statement rewrites a whole storm of rows inside one commit."""
    db = store.db
    db.execute("UPDATE message SET state = 'incoming' WHERE rowid IN"
               " (SELECT rowid FROM message WHERE state = 'maildrop' LIMIT +?)", (limit,))
    changed = db.changes()
    db.execute("UPDATE message SET state = 'incoming' WHERE rowid IN (SELECT rowid FROM message"
               " WHERE state = 'deferred' AND next_attempt <= ? ORDER BY next_attempt LIMIT +?)", (now, limit))
    return changed + db.changes()


def promote_maildrop(store: Store, limit: int = PROMOTE_BATCH, param: tuple[str, str] | None = None,
                     override: str = "", logs: list[tuple[str, str]] | None = None) -> int:
    """Up to *limit* maildrop messages go to incoming (through the state index), or to
    hold when their params have ``PICKUP_HOLD_PARAM`` (root's sendmail held it: the
    header or body checks, a milter's quarantine), which they lose on the way.
    *param* ``(key, value)`` is set in each one's params on the way, or removed when
    *value* is empty: Postfix's pickup writes its content_filter into the queue file
    and drops one found there.  A message whose params have the key *override* gets
    that value under *param*'s key instead (and loses *override*): a FILTER the
    header or body checks gave a local submission, which cleanup writes after
    pickup's content_filter.  With *logs*, the mail log lines a message kept for
    this moment (``cleanup.loglines.LOG_PARAM``, root's sendmail) are taken from it
    and added to *logs* as (queue ID, the stored value), for the caller to write."""
    _quarantine_unreadable(store, limit)  # (their json_type and json_set would fail the whole round)
    hold = f"'$.\"{PICKUP_HOLD_PARAM}\"'"
    state = f"state = CASE WHEN json_type(params, {hold}) IS NULL THEN 'incoming' ELSE 'hold' END"
    returning = f" RETURNING id, json_extract(params, '$.\"{LOG_PARAM}\"')" if logs is not None else ""
    if param is None:
        rows = store.db.execute(f"UPDATE message SET {state}, params = json_remove(params, {hold}) WHERE rowid IN"
                                " (SELECT rowid FROM message WHERE state = 'maildrop' LIMIT +?)" + returning,
                                (limit,)).fetchall()
    else:
        path, given = ('$."' + key.replace('"', "") + '"' for key in (param[0], override or param[0]))
        rows = store.db.execute(f"UPDATE message SET {state}, params = json_remove(CASE"
                                " WHEN ?4 != ?2 AND json_type(params, ?4) IS NOT NULL THEN"
                                " json_set(json_remove(params, ?4), ?2, json_extract(params, ?4))"
                                f" WHEN ?3 = '' THEN json_remove(params, ?2) ELSE json_set(params, ?2, ?3) END, {hold})"
                                " WHERE rowid IN (SELECT rowid FROM message WHERE state = 'maildrop' LIMIT +?1)"
                                + returning, (limit, path, param[1], given)).fetchall()
    if logs is None:
        return store.db.changes()
    kept = [(message_id, value) for message_id, value in rows if value is not None]
    if kept:
        store.db.executemany(f"UPDATE message SET params = json_remove(params, '$.\"{LOG_PARAM}\"') WHERE id = ?",
                             [(message_id,) for message_id, _ in kept])
        logs.extend(kept)
    return len(rows)


def _quarantine_unreadable(store: Store, limit: int) -> None:
    """The messages of the next maildrop batch whose params are not a JSON object
    (queue.db edited by hand) go to ``corrupt``, as a message with a short body does:
    one of them failed every round before, and no mail was claimed (red team 37)."""
    for (message_id,) in store.db.execute(
            "UPDATE message SET state = 'corrupt' WHERE rowid IN (SELECT rowid FROM message WHERE state = 'maildrop'"
            " LIMIT +?) AND NOT (json_valid(params) AND json_type(params) = 'object') RETURNING id",
            (limit,)).fetchall():
        _report_unreadable(message_id)


def _report_unreadable(message_id: str) -> None:
    log.warning("%s: corrupt queue file (its parameters are not a JSON object): moved to the corrupt queue",
                message_id)


def _params(text: str) -> dict | None:
    """A claimed message's params, None when they are not a JSON object."""
    try:
        params = json.loads(text)
    except (ValueError, TypeError, RecursionError):
        return None
    return params if isinstance(params, dict) else None


def next_due(store: Store) -> float | None:
    row = store.db.execute("SELECT min(next_attempt) FROM message WHERE state = 'deferred'").fetchone()
    return row[0]


def claim(store: Store, limit: int, now: float, recipients: int | None = None) -> list[ClaimedMessage]:
    """Move up to *limit* messages to active and load them, taking new mail
    (incoming, oldest first, through the (state, id) index) and due retries
    (deferred, earliest due first, through the deferred rows' next_attempt index) in
    turn, as Postfix's qmgr alternates its incoming and deferred scans: a retry
    storm never keeps new mail waiting, nor new mail a retry.  No sort, no
    statement touching more than *limit* rows of each queue.  With *recipients*,
    claiming stops once the claimed messages have that many recipients
    (qmgr_message_recipient_limit; the first message is always taken).  Each comes
    with its ``flushed`` time, read with the row that made it due: a claim never
    sees mail a flush made due without the mark of that flush."""
    if limit <= 0:
        return []
    db = store.db
    new = db.execute(f"{_CLAIM_COLUMNS} WHERE state = 'incoming' ORDER BY id LIMIT +?", (limit,)).fetchall()
    due = db.execute(f"{_CLAIM_COLUMNS} WHERE state = 'deferred' AND next_attempt <= ?"
                     " ORDER BY next_attempt LIMIT +?", (now, limit)).fetchall()
    taken: list[tuple[str, tuple]] = []
    for i in range(max(len(new), len(due))):
        taken += [("incoming", new[i])] if i < len(new) else []
        taken += [("deferred", due[i])] if i < len(due) else []
    claimed: list[ClaimedMessage] = []
    loaded = 0
    for state, (message_id, sender, arrival, size, params, flushed, stored) in taken[:limit]:
        if recipients is not None and claimed and loaded >= recipients:
            break
        if stored != size:  # a missing or short body is never sent: Postfix's corrupt queue
            quarantine(store, message_id, state)
            log.warning("%s: corrupt queue file (content %s of %d bytes): moved to the corrupt queue",
                        message_id, "missing" if stored is None else f"{stored}", size)
            continue
        if (loaded_params := _params(params)) is None:  # as a short body: kept, never sent (red team 37)
            quarantine(store, message_id, state)
            _report_unreadable(message_id)
            continue
        store.transition(message_id, state, "active")
        pending = [QueuedRecipient(*r) for r in db.execute(
            "SELECT seq, address, attempts, last_reply FROM recipient WHERE message_id = +?"
            " AND status IN ('pending', 'deferred') ORDER BY seq", (message_id,))]
        loaded += len(pending)
        claimed.append(ClaimedMessage(message_id, sender, arrival, now, size, loaded_params, pending,
                                      retry=any(r.attempts for r in pending), flushed=flushed))
    return claimed


def park(store: Store, parked: list[tuple[str, float]]) -> None:
    """Active messages go back to the deferred queue, each due at its time, without
    a delivery attempt: their recipients keep their status, attempts and replies
    (their destinations hold their share of the active queue)."""
    for message_id, until in parked:
        store.db.execute("UPDATE message SET state = 'deferred', next_attempt = ? WHERE id = ? AND state = 'active'",
                         (until, message_id))
        if store.db.changes() != 1:
            raise TransitionError(f"{message_id}: not active")


def quarantine(store: Store, message_id: str, expected: str = "active") -> None:
    """Move a message whose queue file cannot be read whole to the ``corrupt`` state:
    kept for the operator (``trimail queue list``), never delivered or deleted."""
    store.transition(message_id, expected, "corrupt")


def record(store: Store, message_id: str, results: list[RecipientResult]) -> None:
    store.db.executemany(
        "UPDATE recipient SET status = ?, attempts = attempts + 1, next_attempt = ?, last_reply = ?, notified = ?"
        " WHERE message_id = ? AND seq = ?",
        [(r.status, r.next_attempt, r.reply, r.owed, message_id, r.seq) for r in results])


def owed_notices(store: Store, message_id: str) -> list[tuple[str, str, int]]:
    """The sent recipients owed a success notice, ``(address, last reply, code)``, each
    marked told: the caller queues one notice for them in the same transaction (as
    Postfix's qmgr flushes a message's trace once its round is done)."""
    db = store.db
    owed = [tuple(r) for r in db.execute(
        "SELECT address, coalesce(last_reply, ''), notified FROM recipient WHERE message_id = +?"
        " AND status = 'sent' AND notified > 1 ORDER BY seq", (message_id,))]
    if owed:
        db.execute("UPDATE recipient SET notified = 1 WHERE message_id = ? AND status = 'sent' AND notified > 1",
                   (message_id,))
    return owed  # type: ignore[return-value]


def finish(store: Store, message_id: str,
           notify: Callable[[list[tuple[str, str]]], None] | None = None,
           warn: Callable[[list[tuple[str, str]]], bool] | None = None) -> Finished:
    """After a delivery round: defer the message if any recipient is deferred, else
    remove it.  Recipients that bounced and were not yet reported are passed to
    *notify* (while the message and its content still exist, in the same
    transaction, so the caller can queue one DSN) and marked reported.  A deferred
    message not yet warned about passes its deferred recipients to *warn*; when
    that returns True (a delay warning was queued) the message is marked warned."""
    db = store.db
    bounced = [tuple(b) for b in db.execute(
        "SELECT address, coalesce(last_reply, '') FROM recipient WHERE message_id = +? AND status = 'bounced'"
        " AND notified = 0 ORDER BY seq", (message_id,))]
    if bounced:  # none (every message delivered): nothing to mark, one statement fewer per message
        if notify is not None:
            notify(bounced)
        db.execute("UPDATE recipient SET notified = 1 WHERE message_id = ? AND status = 'bounced'", (message_id,))
    row = db.execute(
        "SELECT count(*), min(coalesce(next_attempt, 0)) FROM recipient WHERE message_id = ?"
        " AND status IN ('pending', 'deferred')", (message_id,)).fetchone()
    if row[0]:
        next_attempt = row[1]
        if warn is not None and not db.execute("SELECT delay_warned FROM message WHERE id = ?",
                                               (message_id,)).fetchone()[0]:
            waiting = [tuple(r) for r in db.execute(
                "SELECT address, coalesce(last_reply, '') FROM recipient WHERE message_id = +?"
                " AND status = 'deferred' ORDER BY seq", (message_id,))]
            if waiting and warn(waiting):
                db.execute("UPDATE message SET delay_warned = 1 WHERE id = ?", (message_id,))
        db.execute("UPDATE message SET state = 'deferred', next_attempt = ? WHERE id = ? AND state = 'active'",
                   (next_attempt, message_id))
        if db.changes() != 1:
            raise TransitionError(f"{message_id}: not active")
        return Finished(False, next_attempt, bounced)
    remove(store, message_id)
    return Finished(True, None, bounced)


def remove(store: Store, message_id: str) -> bool:
    store.db.execute("DELETE FROM message WHERE id = ?", (message_id,))
    return store.db.changes() == 1


def read_headers(store: Store, message_id: str) -> bytes:
    """The start of the content, up to the end of the header section (bounded)."""
    row = store.db.execute("SELECT substr(content, 1, ?) FROM body WHERE message_id = ?",
                           (HEADER_BYTES, message_id)).fetchone()
    if row is None:
        return b""
    head = bytes(row[0])
    end = head.find(b"\r\n\r\n")
    return head[: end + 2] if end >= 0 else head


def read_content(store: Store, message_id: str) -> bytes | None:
    return store.read_content(message_id)


def read_chunk(store: Store, message_id: str, offset: int, size: int) -> bytes:
    """*size* bytes of the content from *offset* (incremental blob I/O: a 50 MiB
    message is never in memory whole); b"" past the end or for a missing message."""
    row = store.db.execute("SELECT rowid, length(content) FROM body WHERE message_id = ?", (message_id,)).fetchone()
    if row is None or offset >= row[1]:
        return b""
    with store.db.blob_open("main", "body", "content", row[0], False) as blob:
        blob.seek(offset)
        return bytes(blob.read(min(size, row[1] - offset)))
