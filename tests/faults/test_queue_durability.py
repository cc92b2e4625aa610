"""Acknowledged mail survives kill -9, even while an ordinary SQLite client reads the queue.

Closing any descriptor of ``queue.db`` drops every POSIX lock the process holds on
it (SQLite's "How To Corrupt An SQLite Database File", 2.2).  When serve did that,
the next SQLite client to close the file (the system ``sqlite3`` tool's
``.backup``, a monitoring script, ``trimail sendmail``) believed it was the last
user, checkpointed and deleted ``queue.db-wal``, and serve went on fsyncing new
mail into the unlinked file: after kill -9 the acknowledged mail was gone.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import threading
import time
import urllib.request

import pytest

from tests.faults.conftest import assert_serving, integrity_ok, send, wait_until
from tests.peers import Sink

pytestmark = pytest.mark.skipif(shutil.which("sqlite3") is None, reason="the sqlite3 tool is not installed")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tokens(messages) -> list[str]:
    found = []
    for _, _, content in messages:
        for line in content.split(b"\r\n"):
            if line.startswith(b"Subject: token "):
                found.append(line.split(b" ", 2)[2].decode())
    return found


def _load(port: int, acknowledged: list[str], stop: threading.Event, client: int) -> None:
    number = 0
    while not stop.is_set():
        token = f"c{client}-{number}"
        number += 1
        size = 300_000 if number % 7 == 0 else 200  # some over the in-memory hand-over limit
        body = f"Subject: token {token}\r\n\r\n".encode() + (b"x" * 76 + b"\r\n") * (size // 78 + 1)
        try:
            send(port, ["rcpt@example.com"], body)
        except Exception:
            continue  # refused or cut: not acknowledged, so not counted
        acknowledged.append(token)


@pytest.mark.parametrize("with_backup", [True, False], ids=["sqlite3-backup", "plain"])
def test_kill_9_under_load_loses_no_acknowledged_message(daemon, tmp_path, with_backup):
    with Sink() as sink:
        metrics_port = _free_port()
        settings = dict(relayhost=f"[127.0.0.1]:{sink.port}", metrics_listen=f"127.0.0.1:{metrics_port}")
        first = daemon(**settings)
        acknowledged: list[str] = []
        stop = threading.Event()
        clients = [threading.Thread(target=_load, args=(first.port, acknowledged, stop, n)) for n in range(10)]
        for thread in clients:
            thread.start()
        backups = 0
        scrape_errors: list[OSError] = []
        deadline = time.monotonic() + 3
        try:
            while time.monotonic() < deadline:
                # a monitoring scrape opens a reading connection inside serve
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read()
                except OSError as exc:
                    scrape_errors.append(exc)
                if with_backup:
                    subprocess.run(["sqlite3", str(first.queue_directory / "queue.db"),
                                    f".backup {tmp_path / 'backup.db'}"], check=True, timeout=30,
                                   capture_output=True)
                    backups += 1
                else:
                    time.sleep(0.05)  # pacing of the scrapes, not synchronisation
        finally:
            first.proc.proc.send_signal(signal.SIGKILL)
            stop.set()
            for thread in clients:
                thread.join(60)
        first.proc.proc.wait(30)
        assert len(acknowledged) >= 20, "the load did not get going"
        assert not with_backup or backups >= 3
        assert integrity_ok(first.queue_directory) == "ok"

        second = daemon(**settings)
        wanted = set(acknowledged)
        wait_until(lambda: wanted <= set(_tokens(sink.messages)), timeout=60)
        delivered = _tokens(sink.messages)
        lost = wanted - set(delivered)
        assert not lost, f"{len(lost)} of {len(wanted)} acknowledged messages lost"
        assert_serving(second)
        assert not scrape_errors, scrape_errors[:3]
