"""A queue file system that something else fills (logs, another program) while mail
waits for its delivery: found by a red team on 1795379.  Every queue write failed,
the queue manager's too, so mail that the next hop had accepted could not be
recorded as delivered, and nothing left the queue until the file system had room
again.  (The idle checkpoint empties the WAL, so even the first record needs new
blocks.)

The fix: the queue manager keeps ``queue.reserve`` (``trimail.queue.reserve``) and
gives its blocks back when a queue write finds the file system full; the smtpd
counts what the reserve lacks as taken, so new mail does not take those bytes.
Here, on a real 16 MiB tmpfs (a 512 KiB reserve) filled to the last byte while the
downstream holds every delivery: the queue drains while the filler stays, new mail
is refused meanwhile, and once the filler is gone the reserve is whole again and
mail is accepted.
"""

from __future__ import annotations

import os
import signal
import smtplib
from pathlib import Path

from tests.faults.conftest import (
    NEEDS_TMPFS,
    assert_serving,
    fill,
    free_space,
    integrity_ok,
    process_tree,
    queued,
    send,
    tmpfs,
    wait_until,
)
from tests.peers import Sink
from trimail.queue.reserve import CHECK_SECONDS, RESERVE_NAME

pytestmark = NEEDS_TMPFS

LIMIT = 60_000  # message_size_limit: MAIL needs 90 KB free, far less than the reserve's 512 KiB
MESSAGES = 12


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1


def test_a_queue_file_system_filled_by_something_else_still_drains(daemon, queue_16m) -> None:
    reserve, wal = queue_16m / RESERVE_NAME, queue_16m / "queue.db-wal"
    with Sink(held=True) as sink:
        served = daemon(relayhost=f"[127.0.0.1]:{sink.port}", queue_directory=str(queue_16m),
                        message_size_limit=str(LIMIT))
        wait_until(lambda: _size(reserve) == 512 << 10, timeout=30)
        body = b"Subject: held %d\r\n\r\n" + (b"y" * 98 + b"\r\n") * 400
        for n in range(MESSAGES):
            send(served.port, [f"r{n}@example.com"], body % n)
        wait_until(lambda: sink.recorder.in_flight >= 1, timeout=30)  # deliveries in flight, held
        wait_until(lambda: _size(wal) == 0, timeout=30)  # the idle checkpoint emptied the WAL
        filler = fill(queue_16m, leave=0)
        # full, unless a queue write in between found it so and the reserve went already (seen
        # once); a queue write that ended after the fill may give blocks back (its WAL truncated
        # by the idle checkpoint: 800 KB seen once): those are filled too
        more = [filler]

        def full() -> bool:
            if free_space(queue_16m) < 64 << 10 or _size(reserve) == 0:
                return True
            more.append(fill(queue_16m, leave=0, name=f"filler{len(more)}"))
            return False

        wait_until(full, timeout=30, interval=0.5)

        sink.release()  # every delivery is accepted downstream: now they must be recorded

        def subjects() -> set[bytes]:
            return {line for _, _, content in sink.messages for line in content.split(b"\r\n")
                    if line.startswith(b"Subject: held ")}

        wait_until(lambda: len(subjects()) == MESSAGES, timeout=60, interval=0.1)
        wait_until(lambda: queued(queue_16m) == 0, timeout=60, interval=0.2)
        assert filler.exists() and _size(reserve) == 0  # drained while the file system stayed full
        assert any("released the queue space reserve (524288 bytes)" in line for line in served.proc.log)
        # the released bytes are the queue manager's: new mail is refused (at MAIL FROM, or at
        # the end of DATA once the database's free pages let it pass MAIL), not let into them
        with smtplib.SMTP("127.0.0.1", served.port, timeout=30) as client:
            client.ehlo("client.example")
            code, reply = client.mail("late@client.example")
            if code == 250:
                assert client.rcpt("late@example.com")[0] == 250
                code, reply = client.data(body % 99)
            assert code == 452, reply
        assert queued(queue_16m) == 0 and _size(reserve) == 0
        assert_serving(served)

        for each in more:
            each.unlink()
        wait_until(lambda: _size(reserve) == 512 << 10, timeout=CHECK_SECONDS + 20, interval=0.2)
        wait_until(lambda: any("queue space reserve restored (524288 bytes)" in line for line in served.proc.log),
                   timeout=10)
        send(served.port, ["again@example.com"], b"Subject: held again\r\n\r\nafter\r\n")
        wait_until(lambda: b"Subject: held again" in subjects(), timeout=30, interval=0.1)
        assert_serving(served)
    assert integrity_ok(queue_16m) == "ok"


def test_serve_starts_again_on_a_full_file_system_with_mail_left_in_delivery(daemon, queue_16m) -> None:
    """Killed while deliveries were in flight, on a file system that something else
    has filled since: the next start must put them back in the incoming queue (a
    write), which failed and ended serve (``fatal: ... queue file system full``)
    although the reserve was whole.  Start-up recovery gives it up now."""
    reserve = queue_16m / RESERVE_NAME
    with Sink(held=True) as sink:
        params = {"relayhost": f"[127.0.0.1]:{sink.port}", "queue_directory": str(queue_16m),
                  "message_size_limit": str(LIMIT)}
        served = daemon(**params)
        wait_until(lambda: _size(reserve) == 512 << 10, timeout=30)
        for n in range(5):
            send(served.port, [f"r{n}@example.com"], b"Subject: in flight %d\r\n\r\nbody\r\n" % n)
        wait_until(lambda: sink.recorder.in_flight >= 1, timeout=30)
        for pid in reversed(process_tree(served.proc.proc.pid)):
            os.kill(pid, signal.SIGKILL)
        served.proc.proc.wait(10)
        wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in process_tree(served.proc.proc.pid)),
                   timeout=10)
        fill(queue_16m, leave=0)
        again = daemon(**params)  # "daemon started", or the fixture's assertion with the log
        assert any("released the queue space reserve" in line for line in again.proc.log)
        assert any("recovered" in line and "left active" in line for line in again.proc.log)
        assert_serving(again)
        sink.release()
        wait_until(lambda: queued(queue_16m) == 0, timeout=60, interval=0.2)
        assert_serving(again)
    assert integrity_ok(queue_16m) == "ok"


def test_a_file_system_filled_while_a_large_wal_waits_for_its_copy_still_drains(daemon, tmp_path) -> None:
    """The red team's second shape: the disk fills while the WAL still holds 4 MB of
    new mail that its copy into the database (the checkpoint) must grow the database
    by.  The released reserve (8 MiB on a 300 MiB file system) lets that copy end, so
    the WAL starts over in the blocks it has, and the deliveries are recorded.  (On a
    file system under 256 MiB the reserve is a 32nd of it and may be too small for
    that: docs/operations.md.)"""
    with tmpfs(tmp_path / "queue", "300m") as queue:
        reserve = queue / RESERVE_NAME
        with Sink(held=True) as sink:
            served = daemon(relayhost=f"[127.0.0.1]:{sink.port}", queue_directory=str(queue))
            wait_until(lambda: _size(reserve) == 8 << 20, timeout=30)
            body = b"Subject: waiting %d\r\n\r\n" + (b"w" * 98 + b"\r\n") * 1000
            for n in range(45):
                send(served.port, [f"r{n}@example.com"], body % n)
            assert _size(queue / "queue.db-wal") > 2 << 20  # new mail not yet copied into the database
            fill(queue, leave=0)
            sink.release()
            wait_until(lambda: queued(queue) == 0, timeout=60, interval=0.2)
            assert (queue / "filler").exists() and free_space(queue) < 8 << 20
            assert_serving(served)
        assert integrity_ok(queue) == "ok"


def test_serve_starts_when_its_queue_index_record_finds_the_file_system_full(daemon, queue_16m) -> None:
    """Found by the session's clean-clone run of the test above: serve records the
    queue index it has open in pid/queue.index at start, and that truncate-and-write
    needed a new block; on a file system filled to the last byte (recovery's writes
    had taken the block the truncate gave back) the ENOSPC ended serve with a
    traceback.  The record is written in place now, and one that cannot be written
    costs a warning, not the start.  Here the old record is emptied first, so writing
    it needs a block whatever else happens."""
    served = daemon(queue_directory=str(queue_16m))
    for pid in reversed(process_tree(served.proc.proc.pid)):  # killed: its -wal and -shm stay, as in the test above
        os.kill(pid, signal.SIGKILL)
    served.proc.proc.wait(10)
    wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in process_tree(served.proc.proc.pid)),
               timeout=10)
    (queue_16m / "pid" / "queue.index").write_bytes(b"")
    # (the reserve would be given back at the first full write; the queue manager makes
    # it after "daemon started", so a serve killed at once may have none yet)
    (queue_16m / RESERVE_NAME).unlink(missing_ok=True)
    fill(queue_16m, leave=0)
    again = daemon(queue_directory=str(queue_16m))
    wait_until(lambda: any("cannot record the queue index" in line for line in again.proc.log), timeout=10)
    assert_serving(again)
