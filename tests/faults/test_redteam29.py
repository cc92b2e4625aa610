"""Red team 29: a running ``trimail serve`` (smtpd workers, and one process where it
matters) against an operator's main.cf edits, signals, the queue's shared-memory
file and a low descriptor limit.

Each test states what the rule (nothing outside one SMTP session ends or wedges
serve, nothing acknowledged with ``250`` is lost) asks for; they were found
failing on 01b0a42.  Downstream servers bind 127.0.0.6x only.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.faults.conftest import (
    assert_serving,
    banner,
    serve_status,
    wait_until,
)
from tests.peers import Sink

SINK_HOST = "127.0.0.62"


def _running(d, role: str) -> list[int]:
    return [w["pid"] for w in serve_status(d.queue_directory)["workers"]
            if w["role"] == role and w.get("state") == "running"]


def _tokens(sink: Sink) -> set[str]:
    found = set()
    for _, _, content in sink.messages:
        for line in content.split(b"\r\n"):
            if line.startswith(b"Subject: token "):
                found.add(line.split(b" ", 2)[2].decode())
    return found


def _mail(token: str) -> bytes:
    return f"Subject: token {token}\r\n\r\nbody\r\n".encode()


def _greets(port: int, timeout: float = 2.0) -> bool:
    try:
        return banner(port, timeout=timeout).startswith("220 ")
    except OSError:
        return False


def _replace_worker(d, role: str = "smtpd") -> int:
    """SIGKILL one worker of *role* (a crash, the OOM killer) and wait for its replacement."""
    [victim, *_] = _running(d, role)
    count = len(_running(d, role))
    os.kill(victim, signal.SIGKILL)
    d.proc.wait_log(rf"warning: process trimail/{role} pid {victim} killed by signal 9")
    wait_until(lambda: victim not in _running(d, role) and len(_running(d, role)) == count, timeout=30)
    return victim


def _still_running(d, seconds: float = 2.0) -> bool:
    """serve has not exited within *seconds* (a bounded wait for a negative)."""
    try:
        d.proc.proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return True
    return False


# -- signals ------------------------------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    """Every process below *pid* (the fork server, the workers, helpers), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.mark.parametrize("workers", [2, 0])
@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM],
                         ids=["SIGUSR1", "SIGUSR2", "SIGALRM"])
def test_a_stray_signal_to_the_master_does_not_end_serve(daemon, signum, workers):
    """The master handles SIGTERM, SIGINT and SIGHUP and Python ignores SIGPIPE and
    SIGXFSZ; any other signal whose default is to terminate (an operator's habit
    ``kill -USR1`` to reopen logs, a stray ``pkill -USR2``, SIGALRM) ended the master
    silently -- no log line -- and PR_SET_PDEATHSIG took every worker and every
    session with it.  Now the master logs and ignores it, and the fork server and
    the workers ignore it (``pkill`` reaches them all): none is restarted."""
    d = daemon(smtpd_workers=workers)
    before = {role: _running(d, role) for role in ("smtpd", "qmgr")} if workers else None
    for pid in [d.proc.proc.pid, *_descendants(d.proc.proc.pid)]:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
    d.proc.wait_log(rf"warning: signal {signal.Signals(signum).name} ignored")
    assert _still_running(d), f"serve exited, status {d.proc.proc.returncode}:\n" + "\n".join(d.proc.log[-20:])
    assert_serving(d)
    if workers:
        assert {role: _running(d, role) for role in ("smtpd", "qmgr")} == before
    assert not any("exit status" in line or "killed by signal" in line for line in d.proc.log)
