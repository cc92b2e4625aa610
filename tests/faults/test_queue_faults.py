"""The queue fails under serve: vanished, truncated, damaged, locked, full.

What each costs: a queue that should exist and does not stops serve at start with
one line (never a silently empty queue); a message whose content cannot be read
whole goes to the ``corrupt`` state and is never sent; a locked or full queue
costs the writes that meet it (451/452 to the client, a deferred scheduler round
or outcome retried later), never the daemon.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import apsw
import pytest

from tests.conftest import trimail
from tests.faults.conftest import NEEDS_TMPFS, assert_serving, fill, integrity_ok, send, wait_until
from tests.peers import Sink


def _queue(config_path: Path) -> list[dict]:
    result = trimail("queue", "list", "--json", "-c", str(config_path))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _states(config_path: Path) -> dict[str, str]:
    return {entry["id"]: entry["state"] for entry in _queue(config_path)}


def _subjects(sink: Sink) -> list[bytes]:
    return [line for _, _, content in sink.messages for line in content.split(b"\r\n")
            if line.startswith(b"Subject: ")]


def _body(subject: str, size: int = 0) -> bytes:
    return f"Subject: {subject}\r\n\r\n".encode() + (b"y" * 70 + b"\r\n") * (size // 72 + 1)


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_serve_refuses_a_queue_database_that_vanished(daemon, tmp_path, damage):
    first = daemon(master_service_disable="qmgr")
    for n in range(3):
        send(first.port, ["bob@example.com"], _body(f"queued {n}"))
    assert first.proc.stop() == 0
    database = first.queue_directory / "queue.db"
    for leftover in ("queue.db-wal", "queue.db-shm"):
        (first.queue_directory / leftover).unlink(missing_ok=True)
    if damage == "deleted":
        database.unlink()
    else:
        database.write_bytes(b"")
    result = trimail("serve", "-c", str(first.config_path))
    assert result.returncode != 0
    assert "queue.db: " + ("missing" if damage == "deleted" else "empty") in result.stderr
    assert "restore" in result.stderr and "Traceback" not in result.stderr
    assert "daemon started" not in result.stderr
    assert not database.exists() or database.stat().st_size == 0  # nothing created over it


def test_a_fresh_queue_directory_still_starts_empty(daemon, tmp_path):
    first = daemon(master_service_disable="qmgr", queue_directory=tmp_path / "brand-new" / "queue")
    assert_serving(first)
    assert (first.queue_directory / "queue.stamp").exists()


def test_missing_or_short_content_is_quarantined_and_never_sent(daemon, tmp_path):
    first = daemon(master_service_disable="qmgr")
    gone = send(first.port, ["bob@example.com"], _body("body deleted", 2000))
    short = send(first.port, ["bob@example.com"], _body("body truncated", 400_000))
    whole = send(first.port, ["bob@example.com"], _body("body whole", 2000))
    assert first.proc.stop() == 0
    db = apsw.Connection(str(first.queue_directory / "queue.db"))
    db.execute("DELETE FROM body WHERE message_id = ?", (gone,))
    db.execute("UPDATE body SET content = substr(content, 1, 100000) WHERE message_id = ?", (short,))
    db.close()
    with Sink() as sink:
        second = daemon(relayhost=f"[127.0.0.1]:{sink.port}")
        wait_until(lambda: _states(second.config_path) == {gone: "corrupt", short: "corrupt"}, timeout=30)
        wait_until(lambda: _subjects(sink) == [b"Subject: body whole"], timeout=30)
        assert_serving(second)
        assert any("corrupt queue file" in line and gone in line for line in second.proc.log)
        # the corrupt messages stay where they are: a restart neither sends nor deletes them
        assert second.proc.stop() == 0
        third = daemon(relayhost=f"[127.0.0.1]:{sink.port}")
        assert_serving(third)
        assert _states(third.config_path) == {gone: "corrupt", short: "corrupt"}
        assert _subjects(sink) == [b"Subject: body whole"]
    assert whole not in _states(first.config_path)


def _corrupt_page_holding(database: Path, offset: int) -> None:
    """Overwrite the overflow-page pointer of the page that holds byte *offset*."""
    data = database.read_bytes()
    page_size = int.from_bytes(data[16:18], "big")
    page_start = offset - offset % page_size
    with open(database, "r+b") as f:  # serve is stopped: nothing holds the file
        f.seek(page_start)
        f.write(b"\xff\xff\xff\xf0")


def test_a_corrupt_page_costs_one_message_not_the_daemon(daemon, tmp_path):
    first = daemon(master_service_disable="qmgr")
    marker = (b"MARKER-" * 10)[:70]
    big = _body("damaged", 300_000).replace(b"y" * 70, marker)
    damaged = send(first.port, ["bob@example.com"], big)
    send(first.port, ["bob@example.com"], _body("intact"))
    assert first.proc.stop() == 0
    assert not (first.queue_directory / "queue.db-wal").exists() or \
        (first.queue_directory / "queue.db-wal").stat().st_size == 0  # checkpointed at stop
    # the damage lands in an overflow page in the middle of the body
    data = (first.queue_directory / "queue.db").read_bytes()
    middle = data.index(marker, data.index(b"Subject: damaged") + 150_000)
    _corrupt_page_holding(first.queue_directory / "queue.db", middle)
    with Sink() as sink:
        second = daemon(relayhost=f"[127.0.0.1]:{sink.port}")
        wait_until(lambda: _subjects(sink) == [b"Subject: intact"], timeout=30)
        wait_until(lambda: _states(second.config_path).get(damaged) == "corrupt", timeout=30)
        assert_serving(second)
        # the peer never got a truncated copy of the damaged message
        assert _subjects(sink) == [b"Subject: intact"]
        send(second.port, ["carol@example.com"], _body("after"))
        wait_until(lambda: b"Subject: after" in _subjects(sink), timeout=30)


def test_queue_locked_by_another_process_during_deliveries(daemon, tmp_path):
    with Sink(delay=1.0) as sink:
        served = daemon(relayhost=f"[127.0.0.1]:{sink.port}", queue_busy_timeout="1s")
        in_flight = send(served.port, ["one@example.com"], _body("in flight"))
        wait_until(lambda: sink.recorder.in_flight == 1 or sink.messages, timeout=20)
        db = apsw.Connection(str(served.queue_directory / "queue.db"))
        db.execute("BEGIN IMMEDIATE")  # an operator's shell holding the write lock
        refused = 0
        try:
            deadline = time.monotonic() + 4
            while time.monotonic() < deadline:
                try:
                    send(served.port, ["two@example.com"], _body("while locked"))
                except AssertionError as exc:  # a 4xx reply, not a reset
                    assert "4.3." in str(exc), exc
                    refused += 1
                assert served.alive
        finally:
            db.execute("ROLLBACK")
            db.close()
        assert refused >= 1
        assert any("queue database locked" in line for line in served.proc.log)
        send(served.port, ["three@example.com"], _body("after the lock"))
        wait_until(lambda: b"Subject: after the lock" in _subjects(sink), timeout=30)
        wait_until(lambda: in_flight not in _states(served.config_path), timeout=30)
        assert_serving(served)
        assert integrity_ok(served.queue_directory) == "ok"


@NEEDS_TMPFS
def test_disk_full_under_the_queue_while_delivering(daemon, tmp_path, small_queue):
    # a peer held until the disk is full: the outcomes are recorded after the disk filled up,
    # and the three messages stay active (claimed, not yet delivered) however loaded the machine
    with Sink(held=True) as sink:
        served = daemon(relayhost=f"[127.0.0.1]:{sink.port}", queue_directory=small_queue,
                        message_size_limit="1000000")
        acknowledged = [send(served.port, [f"a{n}@example.com"], _body(f"before {n}")) for n in range(3)]
        # all three taken into delivery (claimed: a write) before the disk fills; only
        # the recording of their outcomes is to meet the full disk
        wait_until(lambda: sink.recorder.in_flight >= 1
                   and all(_states(served.config_path).get(queue_id) == "active" for queue_id in acknowledged),
                   timeout=30)
        filler = fill(small_queue, leave=0)
        results: list[str] = []
        for n in range(20):
            try:
                send(served.port, ["b@example.com"], _body(f"full {n}", 20_000))
                results.append("250")
            except AssertionError as exc:
                assert " 4" in str(exc) or str(exc).startswith("4") or "(45" in str(exc), exc
                results.append("4xx")
            assert served.alive, "\n".join(served.proc.log[-20:])
        assert "4xx" in results
        sink.release()
        # the peer took the three messages while the disk is full: recording that fails
        wait_until(lambda: len(sink.messages) >= 3, timeout=30)
        wait_until(lambda: not served.alive or any("recording delivery status failed" in line
                                                   for line in served.proc.log), timeout=30)
        assert_serving(served)
        filler.unlink()
        accepted: list[str] = []

        def space_is_back() -> bool:  # serve reads the free space at most once a second (QueueSpace)
            try:
                accepted.append(send(served.port, ["c@example.com"], _body("space is back")))
            except AssertionError as exc:
                assert "452" in str(exc) or "4.3.1" in str(exc), exc
            return bool(accepted)

        wait_until(space_is_back, timeout=10, interval=0.2)
        after = accepted[0]
        wait_until(lambda: sum(1 for s in _subjects(sink) if s.startswith(b"Subject: before ")) >= 3, timeout=60)
        wait_until(lambda: b"Subject: space is back" in _subjects(sink), timeout=60)
        delivered_full = sum(1 for s in _subjects(sink) if s.startswith(b"Subject: full "))
        assert delivered_full >= results.count("250")  # every acknowledged one arrived
        wait_until(lambda: not _queue(served.config_path), timeout=60)
        assert after and acknowledged
        assert integrity_ok(served.queue_directory) == "ok"
