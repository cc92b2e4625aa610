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
import sys
import threading
import time
import urllib.request

import pytest

from tests.faults.conftest import assert_serving, integrity_ok, send, wait_until
from tests.peers import Sink
from tests.ports import free_port as _free_port

pytestmark = pytest.mark.skipif(shutil.which("sqlite3") is None, reason="the sqlite3 tool is not installed")


def _tokens(messages) -> list[str]:
    found = []
    for _, _, content in messages:
        for line in content.split(b"\r\n"):
            if line.startswith(b"Subject: token "):
                found.append(line.split(b" ", 2)[2].decode())
    return found


def _kill_9_under_load(daemon, stop: threading.Event, clients: list[threading.Thread]) -> None:
    """kill -9 while the clients are still sending, then let the clients finish."""
    daemon.proc.proc.send_signal(signal.SIGKILL)
    stop.set()
    for thread in clients:
        thread.join(60)
    daemon.proc.proc.wait(30)


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


@pytest.mark.parametrize("outsider", ["sqlite3-backup", "sendmail", None], ids=["sqlite3-backup", "sendmail", "plain"])
def test_kill_9_under_load_loses_no_acknowledged_message(daemon, tmp_path, outsider):
    with Sink(delay=0.2) as sink:  # a backlog builds: most acknowledged mail is still queued at the kill
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
            while time.monotonic() < deadline or (outsider is not None and backups < 3):
                # a monitoring scrape opens a reading connection inside serve
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read()
                except OSError as exc:
                    scrape_errors.append(exc)
                if outsider == "sqlite3-backup":
                    # What matters is that an outside SQLite client opens and closes the
                    # file.  The tool's .backup restarts whenever serve writes, so under
                    # this load it may never finish: it is stopped after a while.
                    try:
                        subprocess.run(["sqlite3", str(first.queue_directory / "queue.db"),
                                        f".backup {tmp_path / 'backup.db'}"], timeout=5, capture_output=True)
                    except subprocess.TimeoutExpired:
                        pass
                    backups += 1
                elif outsider == "sendmail":  # a local submission: another SQLite client that closes the file
                    token = f"sendmail-{backups}"
                    subprocess.run([sys.executable, "-m", "trimail", "sendmail", "-c", str(first.config_path),
                                    "rcpt@example.com"], input=f"Subject: token {token}\n\nx\n".encode(),
                                   check=True, timeout=30, capture_output=True)
                    acknowledged.append(token)
                    backups += 1
                else:
                    time.sleep(0.05)  # pacing of the scrapes, not synchronisation
        finally:
            _kill_9_under_load(first, stop, clients)
        assert len(acknowledged) >= 20, "the load did not get going"
        assert outsider is None or backups >= 3
        assert integrity_ok(first.queue_directory) == "ok"

        second = daemon(**settings)
        wanted = set(acknowledged)
        wait_until(lambda: wanted <= set(_tokens(sink.messages)), timeout=60)
        delivered = _tokens(sink.messages)
        lost = wanted - set(delivered)
        assert not lost, f"{len(lost)} of {len(wanted)} acknowledged messages lost"
        assert_serving(second)
        assert not scrape_errors, scrape_errors[:3]


def test_trimail_queue_backup_under_load_then_kill_9_and_restore(daemon, tmp_path):
    """The documented backup: consistent copies while serve takes load, no lost
    mail after kill -9, and a restore that brings the copied queue back."""
    from tests.conftest import trimail
    from trimail.queue.store import Store

    first = daemon(master_service_disable="qmgr")
    ids: list[str] = []
    stop = threading.Event()

    def load(client: int) -> None:
        number = 0
        while not stop.is_set():
            number += 1
            try:
                ids.append(send(first.port, ["rcpt@example.com"], f"Subject: token b{client}-{number}\r\n\r\nx\r\n"
                                .encode()))
            except Exception:
                continue

    clients = [threading.Thread(target=load, args=(n,)) for n in range(10)]
    for thread in clients:
        thread.start()
    copies = []
    try:
        wait_until(lambda: len(ids) >= 20, timeout=30)
        for n in range(3):
            before = set(ids)
            result = trimail("queue", "backup", str(tmp_path / f"copy{n}.db"), "-c", str(first.config_path))
            assert result.returncode == 0, result.stderr
            assert "message(s)" in result.stdout
            copies.append((tmp_path / f"copy{n}.db", before))
    finally:
        _kill_9_under_load(first, stop, clients)
    live = {m.id for m in Store.open(first.queue_directory, readonly=True).list_messages()}
    assert set(ids) <= live, f"{len(set(ids) - live)} acknowledged messages lost"
    for path, before in copies:
        assert integrity_ok_file(path) == "ok"
        assert (path.stat().st_mode & 0o777) == 0o600
        assert not path.with_name(path.name + "-wal").exists()
        copied = {row[0] for row in _rows(path, "SELECT id FROM message")}
        assert before <= copied  # everything acknowledged before the backup began is in it

    # restore the last copy in place of the queue
    path, before = copies[-1]
    for name in ("queue.db-wal", "queue.db-shm"):
        (first.queue_directory / name).unlink(missing_ok=True)
    shutil.copyfile(path, first.queue_directory / "queue.db")
    second = daemon(master_service_disable="qmgr")
    assert_serving(second)
    restored = {m.id for m in Store.open(second.queue_directory, readonly=True).list_messages()}
    assert restored == {row[0] for row in _rows(path, "SELECT id FROM message")}


def _rows(path, query: str) -> list[tuple]:
    import apsw

    db = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return list(db.execute(query))
    finally:
        db.close()


def integrity_ok_file(path) -> str:
    return str(_rows(path, "PRAGMA integrity_check")[0][0])


def test_backup_and_postmap_refuse_to_replace_the_live_queue(daemon, tmp_path):
    """Operator slips: a backup or a table named after the queue must not rename a
    file over the live queue.db (serve would go on writing into the unlinked file)."""
    import os

    from tests.conftest import trimail
    from trimail.queue.store import Store

    served = daemon(master_service_disable="qmgr")
    first = send(served.port, ["bob@example.com"])
    queue_db = served.queue_directory / "queue.db"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for target, reason in ((queue_db, "queue directory"), (served.queue_directory / "copy.db", "queue directory"),
                           (fifo, "not a regular file"), (tmp_path, "not a regular file")):
        result = trimail("queue", "backup", str(target), "-c", str(served.config_path))
        assert result.returncode != 0 and reason in result.stderr, (target, result.stderr)
    (served.queue_directory / "queue").write_text("key value\n")
    result = trimail("postmap", f"hash:{served.queue_directory / 'queue'}", "-c", str(served.config_path))
    assert result.returncode != 0 and "not a trimail table" in result.stderr, result.stderr
    second = send(served.port, ["carol@example.com"])
    assert served.proc.stop() == 0
    assert {m.id for m in Store.open(served.queue_directory, readonly=True).list_messages()} == {first, second}
    assert integrity_ok(served.queue_directory) == "ok"
