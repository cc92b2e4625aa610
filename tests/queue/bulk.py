"""Large queues built directly in the database, for the operator-tool tests and
measurements (``python -m tests.queue.bulk QUEUE_DIRECTORY COUNT``).

Deterministic for a seed: messages in every state, one to three recipients each
spread over *domains* domains (some with a trailing dot or upper case, some
already sent or bounced), arrival times over the last three days."""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

from trimail.queue.ids import _encode
from trimail.queue.store import Store

STATES = ("incoming", "active", "deferred", "deferred", "deferred", "hold", "maildrop")
BATCH = 20_000
BODY = b"Subject: bulk\r\n\r\n" + b"x" * 200 + b"\r\n"


def fill_queue(queue_directory: str | Path, messages: int, *, domains: int = 500, seed: int = 0,
               now: float | None = None, start: int = 0) -> None:
    """Add *messages* messages (IDs numbered from *start*) to the queue in *queue_directory*."""
    now = time.time() if now is None else now
    rng = random.Random(seed)
    store = Store.open(queue_directory)
    try:
        done = 0
        while done < messages:
            rows, rcpts, bodies = [], [], []
            for number in range(start + done, start + min(messages, done + BATCH)):
                arrival = now - rng.choice((60, 600, 7200, 100_000, 250_000)) * rng.random()
                queue_id = _encode(int(arrival * 1e6), 10) + _encode(number % 51**4, 4)
                state = rng.choice(STATES)
                due = arrival + 300 if state == "deferred" else None
                rows.append((queue_id, state, f"s{number}@sender.example", arrival, due, len(BODY)))
                for seq in range(rng.choice((1, 1, 1, 2, 3))):
                    domain = f"d{rng.randrange(domains)}.example"
                    domain = rng.choice((domain, domain, domain, domain.upper(), domain + "."))
                    status = rng.choice(("pending", "pending", "deferred", "deferred", "sent", "bounced")) \
                        if state == "deferred" else "pending"
                    rcpts.append((queue_id, seq, f"u{number}.{seq}@{domain}", status,
                                  1 if status != "pending" else 0, due if status == "deferred" else None))
                bodies.append((queue_id, BODY))
            with store.transaction():
                store.db.executemany("INSERT INTO message (id, state, sender, arrival_time, next_attempt, size)"
                                     " VALUES (?, ?, ?, ?, ?, ?)", rows)
                store.db.executemany("INSERT INTO recipient (message_id, seq, address, status, attempts,"
                                     " next_attempt) VALUES (?, ?, ?, ?, ?, ?)", rcpts)
                store.db.executemany("INSERT INTO body (message_id, content) VALUES (?, ?)", bodies)
            done += len(rows)
    finally:
        store.close()


if __name__ == "__main__":
    fill_queue(sys.argv[1], int(sys.argv[2]))
