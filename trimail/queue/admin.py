"""The operator's queue SQL: the changes (``trimail queue flush/hold/release/delete/
requeue``, ETRN), run inside the caller's transaction (``Store.transaction()`` in
the CLI, the writer's group commit in serve), and the queue's shape (``trimail
queue summary``, Postfix's qshape), aggregated by SQLite and streamed.

A recipient's *site* is the text after the last ``@`` of its address, in lower
case and without trailing dots (``SITE``); ``flush -d``/ETRN select the deferred
recipients by it through the ``recipient_site`` index (partial: deferred rows
only), so making one site's mail due costs the rows of
that site, not a scan of the queue (ETRN runs inside the group commit every
``250`` waits on).  Case is folded for ASCII only, as DNS compares names.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import apsw

from trimail.queue.database import storage_error
from trimail.queue.store import Store

# The recipient's site; the same text as the recipient_site index of schema.py (3 -> 4)
# so that SQLite uses the index.  The CASE takes the common address with one "@"
# without the quadratic rtrim() that finds the last "@" of a quoted local part.
SITE = """lower(rtrim(CASE WHEN instr(substr(address, instr(address, '@') + 1), '@') = 0
        THEN substr(address, instr(address, '@') + 1)
        ELSE substr(address, length(rtrim(address, replace(address, '@', ''))) + 1) END, '.'))"""

# qshape's first age buckets (minutes 5, 60, 1440), as the summary has always shown them
AGE_BUCKETS: tuple[tuple[str, float], ...] = (("5m", 300), ("1h", 3600), ("1d", 86400), ("older", float("inf")))

_SUMMARY = (
    "SELECT m.state, " + SITE.replace("address", "r.address") + " AS site, count(*) AS total,"
    " sum(?1 - m.arrival_time <= 300),"
    " sum(?1 - m.arrival_time > 300 AND ?1 - m.arrival_time <= 3600),"
    " sum(?1 - m.arrival_time > 3600 AND ?1 - m.arrival_time <= 86400),"
    " sum(?1 - m.arrival_time > 86400)"
    " FROM recipient AS r JOIN message AS m ON m.id = r.message_id"
    " WHERE r.status IN ('pending', 'deferred')"
    " GROUP BY m.state, site ORDER BY m.state, total DESC, site")


def summary(store: Store, now: float | None = None) -> Iterator[tuple[str, str, int, list[int]]]:
    """(queue, site, recipients, recipients per age bucket) for the recipients not
    yet done, by queue then most recipients first; one snapshot of the queue.  SQLite
    groups and sorts (spilling to temporary files when it must), so memory does not
    grow with the queue; only the rows are handed out, one at a time."""
    now = time.time() if now is None else now
    try:
        with store.read_snapshot():
            for state, site, total, *ages in store.db.execute(_SUMMARY, (now,)):
                yield state, site, total, ages
    except apsw.Error as exc:  # busy past the timeout, damaged, temporary files full: one line for the operator
        raise storage_error(exc) from None


def flush(store: Store, ids: list[str] | None, now: float | None = None) -> int:
    """Make deferred mail due now (all, or the given IDs); the number of messages made
    due.  All is two set-based UPDATEs (Postfix's ``postqueue -f`` touches no file
    either), not two per message, and rows already due are left as they are: every
    flush rewrote every deferred row, and a user's flush loop (any user may flush)
    held the write lock 0.8 s a flush at 100,000 deferred messages (red team 34).
    Each message made due is marked ``flushed`` (*now*), as ``flush_site`` marks its own."""
    now = time.time() if now is None else now
    db = store.db
    if ids is None:
        db.execute("UPDATE recipient SET next_attempt = ?1 WHERE status = 'deferred' AND next_attempt > ?1"
                   " AND message_id IN (SELECT id FROM message WHERE state = 'deferred')", (now,))
        db.execute("UPDATE message SET next_attempt = ?1, flushed = ?1 WHERE state = 'deferred'"
                   " AND next_attempt > ?1", (now,))
        return db.changes()
    count = 0
    for message_id in ids:
        db.execute("UPDATE message SET next_attempt = ?1, flushed = ?1 WHERE id = ?2 AND state = 'deferred'",
                   (now, message_id))
        count += db.changes()
        db.execute("UPDATE recipient SET next_attempt = ? WHERE message_id = ? AND status = 'deferred'",
                   (now, message_id))
    return count


def flush_site(store: Store, site: str, now: float | None = None) -> int:
    """Make the deferred mail queued for *site* due now (Postfix's ``postqueue -s``):
    the deferred recipients whose site is *site* (ASCII case and trailing dots
    aside) and their messages; the other recipients of those messages keep their
    times.  Returns how many messages were made due.  Found through the
    ``recipient_site`` index: the cost follows that site's mail, not the queue.

    Each message made due is marked ``flushed`` (*now*) in the same transaction, as
    Postfix's flush(8) marks each queue file it flushes for qmgr: the round that
    claims it finds its destinations alive if they were declared dead before the
    flush (``scheduler.dead.DeadSites.refusal``), even when that round comes before
    the queue manager hears of the flush (the trigger ``F``, a control command)."""
    now = time.time() if now is None else now
    site = site.rstrip(".")
    db = store.db
    # driven from the site's recipients: "+state" keeps SQLite from walking every
    # deferred message through message_deferred instead
    db.execute("UPDATE message SET next_attempt = ?1, flushed = ?1 WHERE id IN (SELECT message_id FROM recipient WHERE "
               + SITE + " = lower(?2) AND status = 'deferred') AND +state = 'deferred'", (now, site))
    count = db.changes()
    db.execute("UPDATE recipient SET next_attempt = ?1 WHERE " + SITE + " = lower(?2) AND status = 'deferred'"
               " AND (SELECT state FROM message WHERE id = message_id) = 'deferred'", (now, site))
    return count


def existing_ids(store: Store, ids: list[str] | None, states: tuple[str, ...]) -> list[str]:
    """IDs (all when None) of messages in one of *states*."""
    if ids is None:
        return [r[0] for r in store.db.execute(
            "SELECT id FROM message WHERE state IN (SELECT value FROM json_each(?)) ORDER BY id",
            (json.dumps(list(states)),))]
    found = []
    for message_id in ids:
        row = store.db.execute("SELECT state FROM message WHERE id = ?", (message_id,)).fetchone()
        if row is not None and row[0] in states:
            found.append(message_id)
    return found


def set_state(store: Store, ids: list[str] | None, new: str, expected: tuple[str, ...], now: float) -> list[str]:
    """Move each message (all when *ids* is None) in one of *expected* states to *new*;
    return those moved."""
    moved = []
    for message_id in existing_ids(store, None, expected) if ids is None else ids:
        row = store.db.execute("SELECT state FROM message WHERE id = ?", (message_id,)).fetchone()
        if row is None or row[0] not in expected:
            continue
        store.transition(message_id, row[0], new)
        if new in ("incoming", "deferred"):
            store.db.execute("UPDATE message SET next_attempt = ? WHERE id = ?", (now, message_id))
        moved.append(message_id)
    return moved
