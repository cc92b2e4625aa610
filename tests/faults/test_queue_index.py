"""The queue's WAL (``queue.db-wal``) or its index (``queue.db-shm``) removed while
serve runs: serve's processes keep the unlinked file open, and SQLite cannot tell
that the path now names another file or none.  Red team 29 lost acknowledged mail through a worker
started afterwards (the master now starts none: test_redteam29); the queue tools
(``sendmail``, ``trimail queue ...``) open the queue too, and the one that wrote
made an index of its own beside serve's.  Now every opening of the queue while
serve runs compares the file with the one serve recorded at start
(``pid/queue.index``) and refuses, naming the cure.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.faults.conftest import assert_serving, integrity_ok, queued, send, trimail_cmd


def _recorded(queue: Path) -> list[str]:
    return (queue / "pid" / "queue.index").read_text().split()


def _files(queue: Path) -> list[str]:
    return [str(value) for name in ("queue.db-wal", "queue.db-shm")
            for value in (os.stat(queue / name).st_dev, os.stat(queue / name).st_ino)]


@pytest.mark.parametrize("removed", ["queue.db-shm", "queue.db-wal"])
@pytest.mark.parametrize("workers", [1, 0])
def test_the_queue_tools_refuse_a_queue_whose_wal_was_removed_under_serve(daemon, workers, removed):
    d = daemon(smtpd_workers=workers, master_service_disable="qmgr")
    send(d.port, ["r@far.example"])
    assert _recorded(d.queue_directory) == _files(d.queue_directory)
    os.remove(d.queue_directory / removed)
    result = subprocess.run([sys.executable, "-m", "trimail", "sendmail", "-c", str(d.config_path),
                             "-f", "a@example.org", "b@example.com"],
                            input=b"Subject: x\n\nbody\n", capture_output=True, timeout=60)
    assert result.returncode != 0, result
    assert b"queue.db-wal or -shm was removed or replaced while serve runs" in result.stderr, result.stderr
    for command in (["queue", "list"], ["queue", "delete", "--all"], ["queue", "hold", "--all"]):
        listed = trimail_cmd(*command, "-c", str(d.config_path))
        assert listed.returncode != 0 and "removed or replaced while serve runs" in listed.stderr, (command, listed)
        assert "Traceback" not in listed.stderr
    assert not (d.queue_directory / removed).exists()  # no tool made one of its own
    assert_serving(d)
    d.proc.stop()
    assert queued(d.queue_directory) == 1  # what the tools were asked to delete or hold is untouched
    assert integrity_ok(d.queue_directory) == "ok"


def test_a_serve_that_stopped_leaves_no_index_that_refuses_the_tools(daemon):
    """The record is trusted only while serve holds its lock: after a stop (or a
    kill -9) the queue opens as usual, and the next serve records its own."""
    d = daemon(smtpd_workers=0, master_service_disable="qmgr")
    send(d.port, ["r@far.example"])
    d.proc.proc.kill()
    d.proc.proc.wait()
    listed = trimail_cmd("queue", "list", "-c", str(d.config_path))
    assert listed.returncode == 0, listed
    again = daemon(smtpd_workers=0, master_service_disable="qmgr")
    assert _recorded(again.queue_directory) == _files(again.queue_directory)
