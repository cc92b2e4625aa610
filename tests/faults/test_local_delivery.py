"""Local delivery when mailboxes fight back: a mail client holding the mbox lock,
a full disk under a Maildir, and many first deliveries racing to create one.

Each costs at most a deferral of the mail concerned (with a reason a postmaster
understands), leaves no debris behind, and never holds up ``trimail stop``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import time
from pathlib import Path

from tests.faults.conftest import (
    assert_serving,
    integrity_ok,
    process_tree,
    send,
    trimail_cmd,
    wait_until,
)


def _local(spool: Path, **params: object) -> dict[str, object]:
    return {"mydestination": "mx.test.example", "alias_maps": "", "local_recipient_maps": "",
            "mail_spool_directory": str(spool), **params}


def _holds_open(pid: int, path: Path) -> bool:
    """Whether serve (process *pid* or one of its workers) has *path* open (it is
    waiting to lock it)."""
    for member in process_tree(pid):
        try:
            if any(os.readlink(fd) == str(path) for fd in Path(f"/proc/{member}/fd").iterdir()):
                return True
        except OSError:
            continue
    return False


def _mbox_tags(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [line.split("=", 1)[1] for line in path.read_text().splitlines() if line.startswith("tag=")]


def test_mbox_locked_by_a_mail_client_is_deferred_with_a_clear_reason(tmp_path, daemon):
    spool = tmp_path / "spool"
    spool.mkdir()
    mbox = spool / "ann"
    mbox.touch(mode=0o600)
    d = daemon(**_local(spool, home_mailbox="", deliver_lock_attempts=3, deliver_lock_delay="0.2s"))
    with open(mbox, "r+b") as client:  # a mail client reading the mailbox holds the lock
        fcntl.lockf(client, fcntl.LOCK_EX)
        queue_id = send(d.port, ["ann@mx.test.example"], body=b"Subject: locked\r\n\r\ntag=first\r\n")
        line = d.proc.wait_log(rf"{queue_id}: to=<ann@mx.test.example>.*status=deferred")
        assert "dsn=4.2.0" in line and f"cannot update mailbox {mbox} for user ann" in line \
            and "unable to lock for exclusive access" in line, line
        assert not (spool / "ann.lock").exists()  # our dotlock went with the attempt
        assert_serving(d)
    assert trimail_cmd("flush", "-c", str(d.config_path)).returncode == 0  # the client let go
    wait_until(lambda: _mbox_tags(mbox) == ["first"])
    d.proc.wait_log(rf"{queue_id}: to=<ann@mx.test.example>.*status=sent")  # the attempt is over ...
    assert not (spool / "ann.lock").exists()  # ... and its dotlock is gone (not merely the mail written)


def test_a_live_dotlock_defers_and_a_stale_one_is_broken(tmp_path, daemon):
    spool = tmp_path / "spool"
    spool.mkdir()
    for user in ("old", "new"):
        (spool / user).touch(mode=0o600)
    stale = spool / "old.lock"
    stale.touch()  # its owner dies now; it becomes stale after stale_lock_time
    d = daemon(**_local(spool, home_mailbox="", mailbox_delivery_lock="dotlock", deliver_lock_attempts=2,
                        deliver_lock_delay="0.2s", stale_lock_time="3s"))
    live = spool / "new.lock"
    live.touch()  # a mail client that holds its dotlock right now
    second = send(d.port, ["new@mx.test.example"], body=b"Subject: s\r\n\r\ntag=new\r\n")
    line = d.proc.wait_log(rf"{second}: to=<new@mx.test.example>.*status=")
    assert "status=deferred" in line and "dsn=4.2.0" in line and f"unable to create lock file {live}" in line, line
    assert live.exists() and _mbox_tags(spool / "new") == []  # someone else's lock is left alone
    wait_until(lambda: time.time() - stale.stat().st_ctime > 3.5, timeout=10)  # time passes, nothing else
    first = send(d.port, ["old@mx.test.example"], body=b"Subject: s\r\n\r\ntag=old\r\n")
    d.proc.wait_log(rf"{first}: to=<old@mx.test.example>.*status=sent")
    assert _mbox_tags(spool / "old") == ["old"] and not stale.exists()
    assert_serving(d)


def test_stop_returns_promptly_while_a_delivery_waits_for_the_mbox_lock(tmp_path, daemon):
    spool = tmp_path / "spool"
    spool.mkdir()
    mbox = spool / "ann"
    mbox.touch(mode=0o600)
    params = _local(spool, home_mailbox="")  # Postfix's defaults: 20 attempts, 1 s apart
    d = daemon(**params)
    with open(mbox, "r+b") as client:
        fcntl.lockf(client, fcntl.LOCK_EX)
        send(d.port, ["ann@mx.test.example"], body=b"Subject: locked\r\n\r\ntag=once\r\n")
        wait_until(lambda: _holds_open(d.proc.proc.pid, mbox))  # the delivery is waiting for the lock
        started = time.monotonic()
        stop = trimail_cmd("stop", "-c", str(d.config_path), "--timeout", "15", timeout=30)
        took = time.monotonic() - started
        assert stop.returncode == 0, stop.stderr
        assert took < 5, f"stop took {took:.1f}s"
        assert not (spool / "ann.lock").exists()
        assert integrity_ok(d.queue_directory) == "ok"
    again = daemon(**params)  # the message was kept and goes out once the client let go
    wait_until(lambda: _mbox_tags(mbox) == ["once"])
    assert_serving(again)


def _fill(directory: Path) -> Path:
    """Fill the file system of *directory* to the last block; returns the filler."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 512):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def test_maildir_write_that_fails_leaves_nothing_in_tmp(tmp_path, daemon):
    spool = tmp_path / "spool"
    spool.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(spool)], check=True)
    try:
        d = daemon(**_local(spool))
        first = send(d.port, ["bob@mx.test.example"], body=b"Subject: small\r\n\r\ntag=small\r\n")
        d.proc.wait_log(rf"{first}: to=<bob@mx.test.example>.*status=sent")
        maildir = spool / "bob" / "Maildir"
        filler = _fill(spool)
        big = b"Subject: big\r\n\r\n" + b"x" * 76 + b"\r\n"
        second = send(d.port, ["bob@mx.test.example"], body=big * 4000)
        line = d.proc.wait_log(rf"{second}: to=<bob@mx.test.example>.*status=deferred")
        assert "No space left on device" in line, line
        assert list((maildir / "tmp").iterdir()) == []  # the half-written file is gone
        assert len(list((maildir / "new").iterdir())) == 1
        filler.unlink()  # space comes back
        assert trimail_cmd("flush", "-c", str(d.config_path)).returncode == 0
        wait_until(lambda: len(list((maildir / "new").iterdir())) == 2)
        assert list((maildir / "tmp").iterdir()) == []
        assert_serving(d)
        d.proc.stop()
    finally:
        if subprocess.run(["umount", str(spool)]).returncode != 0:
            subprocess.run(["umount", "-l", str(spool)])


def test_many_first_deliveries_to_fresh_mailboxes_all_arrive(tmp_path, daemon):
    spool = tmp_path / "spool"
    users, each = 40, 3
    params = _local(spool, local_destination_concurrency_limit=20)
    d = daemon(master_service_disable="qmgr", **{k: v for k, v in params.items()})
    for user in range(users):  # queued first, so the scheduler starts them all at once
        for n in range(each):
            send(d.port, [f"u{user}@mx.test.example"], body=f"Subject: s\r\n\r\ntag={user}.{n}\r\n".encode())
    assert d.proc.stop() == 0
    d = daemon(**params)
    expected = users * each
    counted = lambda: sum(len(list(p.iterdir())) for p in spool.glob("*/Maildir/new"))
    deferred = lambda: [line for line in d.proc.log if "status=deferred" in line]
    wait_until(lambda: counted() >= expected or deferred(), timeout=30)
    deferred = deferred()
    assert counted() == expected and not deferred, deferred[:5]
    assert_serving(d)
