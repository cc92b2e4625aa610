"""The operator's reads and changes of the queue (queue/admin.py, Store.counts):
right, and at a cost that follows what they touch, not the length of the queue."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import apsw

from tests.queue.bulk import fill_queue
from trimail.queue import admin, transitions
from trimail.queue.schema import MIGRATIONS
from trimail.queue.store import Store

STATES = ("maildrop", "incoming", "active", "deferred", "hold", "corrupt")


def vm_steps(store: Store, fn: Callable[[], object]) -> int:
    """SQLite virtual machine instructions *fn* makes the connection run (in units of
    10): a measure of work that no other load on the machine can disturb."""
    steps = 0

    def count() -> bool:
        nonlocal steps
        steps += 1
        return False

    store.db.set_progress_handler(count, 10)
    try:
        fn()
    finally:
        store.db.set_progress_handler(None)
    return steps


def counted(store: Store) -> dict[str, int]:
    rows = store.db.execute("SELECT state, count(*) FROM message GROUP BY state")
    return {state: count for state, count in rows}


def test_queue_counts_follow_inserts_transitions_deletes_and_recovery(tmp_path):
    store = Store.open(tmp_path / "queue")
    rng = random.Random(15)
    ids: list[str] = []
    for step in range(600):
        with store.transaction():
            action = rng.random()
            if action < 0.4 or not ids:
                queue_id = f"M{step:06d}"
                store.db.execute("INSERT INTO message (id, state, sender, arrival_time, size) VALUES (?, ?, '', ?, 1)",
                                 (queue_id, rng.choice(STATES), float(step)))
                ids.append(queue_id)
            elif action < 0.8:
                store.db.execute("UPDATE message SET state = ? WHERE id = ?", (rng.choice(STATES), rng.choice(ids)))
            elif action < 0.95:
                transitions.remove(store, ids.pop(rng.randrange(len(ids))))
            else:
                store.recover_active()
        assert store.counts() == counted(store)
    assert store.oldest_arrival() == store.db.execute("SELECT min(arrival_time) FROM message").fetchone()[0]


def test_upgrade_counts_the_messages_already_queued(tmp_path):
    """A queue written by the previous schema gets its counts when serve upgrades it."""
    directory = tmp_path / "queue"
    directory.mkdir()
    db = apsw.Connection(str(directory / "queue.db"))
    for number, migration in enumerate(MIGRATIONS[:3]):
        db.execute(migration)
        db.execute(f"PRAGMA user_version = {number + 1:d}")
    db.executemany("INSERT INTO message (id, state, sender, arrival_time, size) VALUES (?, ?, '', ?, 1)",
                   [(f"M{n}", STATES[n % 4], 100.0 - n) for n in range(10)])
    db.close()
    store = Store.open(directory)
    assert store.counts() == {"maildrop": 3, "incoming": 3, "active": 2, "deferred": 2} == counted(store)
    assert store.oldest_arrival() == 91.0


def scrape(store: Store) -> None:
    store.counts()
    store.oldest_arrival()


def test_metrics_queue_reads_cost_the_same_at_any_queue_length(tmp_path):
    """What a /metrics scrape reads (counts per state, oldest arrival) is a handful
    of rows through indexes: the same work at 2,000 and at 20,000 messages (it was
    a scan of both, ten times the work at ten times the queue)."""
    store = Store.open(tmp_path / "queue")
    store.close()
    fill_queue(tmp_path / "queue", 2_000)
    store = Store.open(tmp_path / "queue", readonly=True)
    small = vm_steps(store, lambda: scrape(store))
    store.close()
    fill_queue(tmp_path / "queue", 18_000, seed=1, start=2_000)
    store = Store.open(tmp_path / "queue", readonly=True)
    large = vm_steps(store, lambda: scrape(store))
    started = time.perf_counter()
    scrape(store)
    print(f"scrape: {small} / {large} x10 VM steps at 2,000 / 20,000 messages, "
          f"{(time.perf_counter() - started) * 1000:.2f} ms")
    store.close()
    assert large <= small + 2, (small, large)


def due_times(store: Store) -> dict[tuple[str, str], float | None]:
    return {(m, a): n for m, a, n in store.db.execute(
        "SELECT message_id, address, next_attempt FROM recipient WHERE status = 'deferred'")}


def test_flush_site_makes_only_that_sites_deferred_mail_due(tmp_path):
    directory = tmp_path / "queue"
    store = Store.open(directory)
    store.close()
    fill_queue(directory, 3_000, domains=40)
    store = Store.open(directory)
    before = due_times(store)
    messages_before = dict(store.db.execute("SELECT id, next_attempt FROM message"))
    with store.transaction():
        count = admin.flush_site(store, "D7.Example.", now=1e10)
    after = due_times(store)
    wanted = {(m, a) for m, a in before
              if a.rpartition("@")[2].lower().rstrip(".") == "d7.example"
              and store.db.execute("SELECT state FROM message WHERE id = ?", (m,)).fetchone()[0] == "deferred"}
    assert wanted and {key for key in after if after[key] == 1e10} == wanted
    assert all(after[key] == before[key] for key in before if key not in wanted)
    flushed = {m for m, n in store.db.execute("SELECT id, next_attempt FROM message") if n == 1e10}
    assert flushed == {m for m, _ in wanted} and count == len(flushed)
    assert all(messages_before[m] == n for m, n in store.db.execute("SELECT id, next_attempt FROM message")
               if m not in flushed)
    store.close()


def test_flush_site_costs_that_sites_mail_not_the_queue(tmp_path):
    """`flush -d` and ETRN (which runs inside the group commit every 250 waits on)
    find a site's mail through an index: flushing a site with no mail is the same
    work at 2,000 and 20,000 messages, and a site's mail costs about its rows."""
    directory = tmp_path / "queue"
    Store.open(directory).close()
    fill_queue(directory, 2_000, domains=50)
    store = Store.open(directory)
    empty_small = vm_steps(store, lambda: admin.flush_site(store, "nowhere.example"))
    store.close()
    fill_queue(directory, 18_000, seed=1, start=2_000, domains=50)
    store = Store.open(directory)
    empty_large = vm_steps(store, lambda: admin.flush_site(store, "nowhere.example"))
    site_large = vm_steps(store, lambda: admin.flush_site(store, "d7.example"))
    rows = store.db.execute("SELECT count(*) FROM recipient WHERE address LIKE '%@d7.example%'").fetchone()[0]
    started = time.perf_counter()
    with store.transaction():
        admin.flush_site(store, "d8.example")
    print(f"flush_site: empty site {empty_small} / {empty_large} x10 VM steps at 2,000 / 20,000 messages; "
          f"a site with {rows} recipient rows {site_large}; {(time.perf_counter() - started) * 1000:.1f} ms")
    store.close()
    assert empty_large <= empty_small + 2, (empty_small, empty_large)
    assert site_large < 10 * rows, (site_large, rows)  # under 100 instructions a recipient row


def test_summary_and_flush_use_the_site_index(tmp_path):
    """The site expression of queue.admin is the text of the recipient_site index."""
    store = Store.open(Path(tmp_path) / "queue")
    plan = " ".join(str(row) for row in store.db.execute(
        "EXPLAIN QUERY PLAN SELECT message_id FROM recipient WHERE " + admin.SITE + " = 'x' AND status = 'deferred'"))
    assert "recipient_site" in plan, plan
    store.close()


def test_a_flush_rewrites_only_what_is_not_due_yet(tmp_path):
    """Red team 34: every flush rewrote every deferred row, due already or not, and
    any user may flush: a loop of flushes held the write lock 0.8 s each at 100,000
    deferred messages and slowed the acceptance of mail 60-fold.  A second flush
    finds nothing to change."""
    directory = tmp_path / "queue"
    Store.open(directory).close()
    fill_queue(directory, 2_000, domains=20)
    store = Store.open(directory)
    now = time.time()
    with store.transaction():
        store.db.execute("UPDATE message SET next_attempt = ? WHERE state = 'deferred'", (now + 3600,))
        store.db.execute("UPDATE recipient SET next_attempt = ? WHERE status = 'deferred'", (now + 3600,))
    deferred = store.db.execute("SELECT count(*) FROM message WHERE state = 'deferred'").fetchone()[0]
    with store.transaction():
        assert admin.flush(store, None, now=now) == deferred > 0
    assert store.db.execute("SELECT count(*) FROM recipient WHERE status = 'deferred' AND next_attempt > ?",
                            (now,)).fetchone()[0] == 0
    before = store.db.total_changes()
    with store.transaction():
        assert admin.flush(store, None, now=now + 1) == 0
    assert store.db.total_changes() == before  # no row written again
    store.close()
