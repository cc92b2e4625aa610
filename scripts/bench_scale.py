"""``scripts/bench --mode scale``: the cost of a queue-manager round against queue size.

For each size W in ``--rows`` (default 10^4, 10^5, 10^6) a fresh queue database
gets W deferred messages that are not due, ``--due`` deferred ones that are
(default 1,000) and, for each count in ``--incoming`` (default 10^5), that many
new ones in ``incoming``: every message with one recipient row and a small body
row, as serve would have written them.  Then, in the same process, each of these
is timed ``--repeat`` times (default 7), every time inside ``BEGIN ... ROLLBACK``
so each repetition sees the same queue, and the median and the least reported
(on a shared machine the least is the figure least disturbed by other work):

- ``promote``: ``transitions.promote_due`` + ``transitions.next_due`` (the
  deferred → incoming step of a round and the time of the next one);
- ``claim``: ``transitions.claim`` of one batch of ``--batch`` messages (default
  100) out of ``incoming``;
- ``round (batch)``: ``scheduler.qmgr.schedule_round(store, now, room)`` — the
  database function of one round, run in the writer's group commit in serve —
  with room for one batch;
- ``round (full)``: the same with the room serve gives it when nothing is active,
  ``qmgr_message_active_limit`` (20,000 by default), and the rows it claimed.

The cost is flat in the queue size when the figures for 10^4, 10^5 and 10^6
waiting rows are the same.  Nothing here touches a running serve.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

CONTENT = b"Subject: scale\r\n\r\nbody\r\n"


def _ids(prefix: str, count: int) -> Iterator[str]:
    return (f"{prefix}{i:011d}" for i in range(count))


def build(store: Any, waiting: int, due: int, incoming: int, now: float) -> None:
    """Fill *store*: deferred rows (ids D..., arrived first), due ones (E...), new ones (N...)."""
    groups = [("D", waiting, "deferred", lambda i: now + 3600 + i % 86_400),
              ("E", due, "deferred", lambda i: now - 1 - i % 600),
              ("N", incoming, "incoming", lambda i: None)]
    with store.transaction():
        for prefix, count, state, next_attempt in groups:
            store.db.executemany(
                "INSERT INTO message (id, state, sender, arrival_time, next_attempt, size) VALUES (?, ?, ?, ?, ?, ?)",
                ((mid, state, "a@client.example", now - 7200 if state == "deferred" else now, next_attempt(i),
                  len(CONTENT)) for i, mid in enumerate(_ids(prefix, count))))
            status = "pending" if state == "incoming" else "deferred"
            store.db.executemany(
                "INSERT INTO recipient (message_id, seq, address, status, attempts, next_attempt)"
                " VALUES (?, 0, ?, ?, ?, ?)",
                ((mid, f"r{i}@d{i % 5000}.example", status, 0 if status == "pending" else 1, next_attempt(i))
                 for i, mid in enumerate(_ids(prefix, count))))
            store.db.executemany("INSERT INTO body (message_id, content) VALUES (?, ?)",
                                 ((mid, CONTENT) for mid in _ids(prefix, count)))


def timed(store: Any, fn: Callable[[], Any], repeat: int) -> tuple[tuple[float, float], Any]:
    """Median and least seconds of *fn* over *repeat* runs, each in a transaction
    rolled back after (the least is the figure least disturbed by a busy machine)."""
    timings, result = [], None
    for _ in range(repeat):
        store.db.execute("BEGIN IMMEDIATE")
        try:
            began = time.perf_counter()
            result = fn()
            timings.append(time.perf_counter() - began)
        finally:
            store.db.execute("ROLLBACK")
    return (statistics.median(timings), min(timings)), result


def claimed_count(result: Any) -> int:
    """How many messages a round claimed, whatever its return shape (a list, or a
    tuple whose first item is the list)."""
    if isinstance(result, tuple):
        result = result[0]
    try:
        return len(result)
    except TypeError:
        return -1


def measure(store: Any, now: float, batch: int, room: int, repeat: int) -> dict:
    from trimail.queue import transitions
    from trimail.scheduler.qmgr import schedule_round

    promote, promoted = timed(store, lambda: (transitions.promote_due(store, now), transitions.next_due(store)),
                              repeat)
    claim, claimed = timed(store, lambda: transitions.claim(store, batch, now), repeat)
    small, small_result = timed(store, lambda: schedule_round(store, now, batch), repeat)
    full, full_result = timed(store, lambda: schedule_round(store, now, room), repeat)
    return {"promote_ms": promote[0] * 1000, "promote_min_ms": promote[1] * 1000, "promoted": promoted[0],
            "claim_ms": claim[0] * 1000, "claim_min_ms": claim[1] * 1000, "claimed": len(claimed),
            "round_batch_ms": small[0] * 1000, "round_batch_min_ms": small[1] * 1000,
            "round_batch_claimed": claimed_count(small_result),
            "round_full_ms": full[0] * 1000, "round_full_min_ms": full[1] * 1000,
            "round_full_claimed": claimed_count(full_result)}


def bench_scale(rows: list[int], incoming: list[int], due: int, batch: int, repeat: int) -> dict:
    from trimail.config.registry import PARAMETERS
    from trimail.queue.store import Store

    param = PARAMETERS["qmgr_message_active_limit"]
    room = param.parse(param.default)
    print(f"scale: a round's database work, median (least) of {repeat} (each rolled back); {due:,} deferred rows due; "
          f"claim batch {batch}; full room {room:,} (qmgr_message_active_limit)", flush=True)
    results = []
    for new in incoming:
        for waiting in rows:
            with tempfile.TemporaryDirectory(prefix="trimail-scale-") as tmp:
                store = Store.open(Path(tmp) / "queue")
                try:
                    now = time.time()
                    began = time.perf_counter()
                    build(store, waiting, due, new, now)
                    built = time.perf_counter() - began
                    figures = measure(store, now, batch, room, repeat)
                finally:
                    store.close()
            row = {"waiting": waiting, "due": due, "incoming": new, "queued": waiting + due + new,
                   "build_s": built, **figures}
            results.append(row)
            print(f"  {waiting:>9,} waiting + {due:,} due + {new:,} incoming: promote {row['promote_ms']:.2f} ms "
                  f"({row['promoted']:,} rows), claim of {batch} {row['claim_ms']:.2f} ms, round (room {batch}) "
                  f"{row['round_batch_ms']:.2f} ms ({row['round_batch_claimed']:,} claimed), round (room {room:,}) "
                  f"{row['round_full_ms']:.1f} ms ({row['round_full_claimed']:,} claimed); built in {built:.0f} s",
                  flush=True)
    print()
    print_table(results, batch, room)
    return {"repeat": repeat, "batch": batch, "room": room, "scale": results}


def print_table(results: list[dict], batch: int, room: int) -> None:
    """Markdown: median (least) milliseconds per figure, and the messages each round claimed."""
    print(f"| deferred not due | due | incoming | promote + next due ms | claim of {batch} ms "
          f"| round, room {batch} ms | round, room {room:,} ms | claimed by that round |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['waiting']:,} | {r['due']:,} | {r['incoming']:,} | {r['promote_ms']:.2f} ({r['promote_min_ms']:.2f}) "
              f"| {r['claim_ms']:.2f} ({r['claim_min_ms']:.2f}) "
              f"| {r['round_batch_ms']:.2f} ({r['round_batch_min_ms']:.2f}) "
              f"| {r['round_full_ms']:.0f} ({r['round_full_min_ms']:.0f}) | {r['round_full_claimed']:,} |")
