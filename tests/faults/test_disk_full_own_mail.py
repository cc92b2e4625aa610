"""A queue file system that trimail's own mail fills (found by a red team on
646ad3d).  Sessions that passed MAIL while there was room sent their DATA one after
another, big ones first, until the file system had 0 bytes free.  From then on
every queue write failed, even the queue manager's record of a delivery and its
removal of delivered mail (each appends to the WAL, and the checkpoint must grow
the database by the mail the WAL holds): nothing was delivered again until the
file system grew, and serve could not even start.

The fix admits a message at the end of DATA only if the file system keeps room
after it for the queue manager (``space.QueueSpace.room_for``).  Here, on a real
16 MiB tmpfs: the same sequence leaves room, and once the held downstream answers,
every acknowledged message is delivered and the queue empties.
"""

from __future__ import annotations

import smtplib

from tests.faults.conftest import (
    NEEDS_TMPFS,
    assert_serving,
    free_space,
    integrity_ok,
    trimail_cmd,
    wait_until,
)
from tests.peers import Sink

pytestmark = NEEDS_TMPFS

LIMIT = 1_000_000  # message_size_limit: MAIL needs 1.5 MB free


def _body(n: int, size: int) -> bytes:
    return f"Subject: fill {n}\r\n\r\n".encode() + (b"z" * 98 + b"\r\n") * max(1, size // 100)


def test_mail_that_would_fill_the_queue_file_system_is_refused_before_deliveries_wedge(daemon, queue_16m) -> None:
    with Sink(held=True) as sink:
        served = daemon(relayhost=f"[127.0.0.1]:{sink.port}", queue_directory=str(queue_16m),
                        message_size_limit=str(LIMIT))
        sessions = []
        for n in range(40):  # all pass MAIL while there is room
            client = smtplib.SMTP("127.0.0.1", served.port, timeout=60)
            client.ehlo("client.example")
            assert client.mail("filler@client.example")[0] == 250
            assert client.rcpt(f"r{n}@example.com")[0] == 250
            sessions.append(client)
        acknowledged: dict[str, int] = {}
        refused = 0
        lowest = free_space(queue_16m)
        n = 0
        for size in (900_000, 400_000, 200_000, 100_000, 50_000, 20_000, 5_000, 1_000):
            while n < len(sessions):
                code, reply = sessions[n].data(_body(n, size))
                n += 1
                lowest = min(lowest, free_space(queue_16m))
                if code != 250:
                    assert code == 452, reply  # 4.3.1: the client tries again later
                    refused += 1
                    break
                acknowledged[reply.decode().rsplit(" ", 1)[-1]] = n - 1
        for client in sessions:
            try:
                client.quit()
            except smtplib.SMTPException:
                pass
        assert refused >= 1 and acknowledged  # the sequence did reach the line
        assert lowest > 0, "the queue's file system was filled to the last byte"
        sink.release()
        expected = {f"Subject: fill {n}".encode() for n in acknowledged.values()}

        def delivered() -> set[bytes]:
            return {line for _, _, content in sink.messages for line in content.split(b"\r\n")
                    if line.startswith(b"Subject: fill ")}

        wait_until(lambda: expected <= delivered(), timeout=60, interval=0.2)

        def queue_empty() -> bool:
            listed = trimail_cmd("queue", "list", "--json", "-c", str(served.config_path))
            return listed.returncode == 0 and listed.stdout.strip() in ("", "[]")

        wait_until(queue_empty, timeout=60, interval=0.5)
        assert_serving(served)
        assert integrity_ok(queue_16m) == "ok"
