"""The operator's queue changes (``trimail queue flush/hold/release/delete/requeue``,
ETRN): SQL run inside the caller's transaction (``Store.transaction()`` in the CLI,
the writer's group commit in serve).
"""

from __future__ import annotations

import json
import time

from trimail.queue.store import Store

def flush(store: Store, ids: list[str] | None, now: float | None = None) -> int:
    """Make deferred mail due now (all, or the given IDs)."""
    now = time.time() if now is None else now
    targets = ids if ids is not None else [r[0] for r in store.db.execute(
        "SELECT id FROM message WHERE state = 'deferred'")]
    count = 0
    for message_id in targets:
        store.db.execute("UPDATE message SET next_attempt = ? WHERE id = ? AND state = 'deferred'",
                         (now, message_id))
        count += store.db.changes()
        store.db.execute("UPDATE recipient SET next_attempt = ? WHERE message_id = ? AND status = 'deferred'",
                         (now, message_id))
    return count


def flush_site(store: Store, site: str, now: float | None = None) -> int:
    """Make the deferred mail queued for *site* due now (Postfix's ``postqueue -s``):
    the deferred recipients whose domain is *site* (case and a trailing dot aside)
    and their messages; the other recipients of those messages keep their times.
    Returns how many messages were made due."""
    now = time.time() if now is None else now
    site = site.lower().rstrip(".")
    due: dict[str, list[str]] = {}
    for message_id, address in store.db.execute(
            "SELECT r.message_id, r.address FROM recipient r JOIN message m ON m.id = r.message_id "
            "WHERE m.state = 'deferred' AND r.status = 'deferred'"):
        if address.rpartition("@")[2].lower().rstrip(".") == site:
            due.setdefault(message_id, []).append(address)
    for message_id, addresses in due.items():
        store.db.execute("UPDATE message SET next_attempt = ? WHERE id = ? AND state = 'deferred'", (now, message_id))
        for address in addresses:
            store.db.execute("UPDATE recipient SET next_attempt = ? WHERE message_id = ? AND address = ? "
                             "AND status = 'deferred'", (now, message_id, address))
    return len(due)


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
