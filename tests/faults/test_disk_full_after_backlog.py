"""After a backlog has left the queue, the space it took inside ``queue.db`` is room
for new mail.  The database never shrinks: the pages of delivered mail wait inside
the file for new mail.  The check at MAIL FROM looked only at the file system's
free space, so a backlog that had grown the database until the file system was
nearly full had the gateway refuse all mail (``452 4.3.1``) long after it had
left.  Now ``space.QueueSpace`` counts the database's free pages as room (a
message's copy into the database takes them first; its WAL frames still need the
file system).

Here, on a real 16 MiB tmpfs: five messages of 900 KB wait for a held
downstream, are delivered and removed; something else then leaves the file system
1 MB free, less than MAIL's 1.5 MB with ``message_size_limit = 1000000``.  New
mail is accepted and delivered.
"""

from __future__ import annotations

import smtplib

from tests.faults.conftest import (
    NEEDS_TMPFS,
    assert_serving,
    fill,
    free_space,
    integrity_ok,
    queued,
    send,
    wait_until,
)
from tests.peers import Sink

pytestmark = NEEDS_TMPFS

LIMIT = 1_000_000  # message_size_limit: MAIL needs 1.5 MB free


def test_the_pages_a_delivered_backlog_left_in_the_database_are_room_for_new_mail(daemon, queue_16m) -> None:
    wal = queue_16m / "queue.db-wal"
    with Sink(held=True) as sink:
        served = daemon(relayhost=f"[127.0.0.1]:{sink.port}", queue_directory=str(queue_16m),
                        message_size_limit=str(LIMIT))
        body = b"Subject: backlog %d\r\n\r\n" + (b"b" * 98 + b"\r\n") * 9_000
        for n in range(5):
            send(served.port, [f"r{n}@example.com"], body % n)
        grown = (queue_16m / "queue.db").stat().st_size + wal.stat().st_size
        sink.release()
        wait_until(lambda: len(sink.messages) == 5, timeout=60, interval=0.1)
        wait_until(lambda: queued(queue_16m) == 0, timeout=60, interval=0.2)
        wait_until(lambda: not wal.exists() or wal.stat().st_size == 0, timeout=30, interval=0.2)  # idle checkpoint
        assert (queue_16m / "queue.db").stat().st_size >= 4_000_000, grown  # the pages stay in the file
        fill(queue_16m, leave=1_000_000)
        assert free_space(queue_16m) < 1.5 * LIMIT

        with smtplib.SMTP("127.0.0.1", served.port, timeout=30) as client:
            client.ehlo("client.example")
            code, reply = client.mail("after@client.example")
            assert code == 250, reply
            assert client.rcpt("new@example.com")[0] == 250
            code, reply = client.data(b"Subject: after the backlog\r\n\r\n" + (b"a" * 98 + b"\r\n") * 1_000)
            assert code == 250, reply
        wait_until(lambda: any(b"Subject: after the backlog" in content for _, _, content in sink.messages),
                   timeout=30, interval=0.1)
        assert_serving(served)
    assert integrity_ok(queue_16m) == "ok"
