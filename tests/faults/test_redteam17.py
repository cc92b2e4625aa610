"""Red team of the fork server and the client board (issue 16 follow-up, issue 17):
a real ``trimail serve`` with smtpd workers, its fork server (trimail.processes.forkserver)
stopped, killed or slow, and its client board (trimail.processes.clients) across
worker deaths and reloads.

Every test binds only loopback addresses in 127.0.45.0/24.  The tests show bugs
that were found failing (marked ``xfail(strict=True)``) and fixed in the same
session; the marks are gone with the fixes.
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.faults.conftest import banner, serve_status, smtp_command, trimail_cmd, wait_until

HOST = "127.0.45.1"


def _running(facts: dict, role: str | None = None) -> list[int]:
    return [w["pid"] for w in facts["workers"]
            if w.get("state") == "running" and (role is None or w["role"] == role)]


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) of *pid*, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(") ", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def _children(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _live_children(pid: int) -> list[int]:
    return [child for child in _children(pid) if (_stat(child) or ("Z", 0))[0] != "Z"]


def _sockets(pid: int) -> int:
    try:
        return sum(os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:") for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def _greeting(port: int, host: str = HOST) -> bytes:
    return banner(port, host).encode()


def _serving(d) -> None:
    assert d.alive, "serve exited:\n" + "\n".join(d.proc.log[-30:])
    assert _greeting(d.port).startswith(b"220 ")


# -- the fork server -----------------------------------------------------------------


def test_a_killed_fork_server_is_reaped(daemon):
    d = daemon(smtpd_workers=1, master_service_disable="qmgr", smtpd_listen=f"{HOST}:0")
    server = serve_status(d.queue_directory)["fork_server"]
    os.kill(server, signal.SIGKILL)
    d.proc.wait_log(rf"fork server pid {server} exited")
    wait_until(lambda: len(_running(serve_status(d.queue_directory), "smtpd")) == 1, timeout=30)
    try:
        wait_until(lambda: _stat(server) is None, timeout=10)
    finally:
        _serving(d)


def test_a_dead_worker_is_replaced_while_the_fork_server_is_stopped(daemon):
    """The fork server is stopped (SIGSTOP: a debugger, a frozen cgroup, heavy swap)
    and the only smtpd worker dies: the master must notice (the worker's pidfd is
    readable once it exits, whoever its parent is) and start a new one, with a new
    interpreter if the fork server does not answer."""
    d = daemon(smtpd_workers=1, master_service_disable="qmgr", smtpd_listen=f"{HOST}:0")
    facts = serve_status(d.queue_directory)
    server, (worker,) = facts["fork_server"], _running(facts, "smtpd")
    os.kill(server, signal.SIGSTOP)
    try:
        os.kill(worker, signal.SIGKILL)
        # only its parent can know how it ended; the master knows that it ended
        d.proc.wait_log(rf"process trimail/smtpd pid {worker} (killed by signal 9|exit status unknown)", timeout=15)
    finally:
        os.kill(server, signal.SIGCONT)
    wait_until(lambda: len([p for p in _running(serve_status(d.queue_directory), "smtpd") if p != worker]) == 1,
               timeout=30, interval=0.5)
    _serving(d)


def test_a_late_fork_starts_no_second_worker(daemon):
    """The fork server is stopped while a reload starts the new generation: after
    REPLY_TIMEOUT the master starts the worker with a new interpreter; when the fork
    server runs again it must not fork the same worker a second time (an smtpd
    worker nobody supervises, sharing the first one's channel, session-board slot
    and client table, accepting on the same listeners)."""
    d = daemon(smtpd_workers=1, master_service_disable="qmgr", smtpd_listen=f"{HOST}:0")
    facts = serve_status(d.queue_directory)
    server = facts["fork_server"]
    os.kill(server, signal.SIGSTOP)
    try:
        os.kill(d.proc.proc.pid, signal.SIGHUP)  # the master asks the stopped fork server, waits 10 s
        d.proc.wait_log(r"reload -- version", timeout=40)
    finally:
        os.kill(server, signal.SIGCONT)
    # once the fork server has read the request nobody waits for any more, it forks (or not) at once
    deadline = time.monotonic() + 5
    extra: list[int] = []
    while time.monotonic() < deadline:
        # a slot still "starting" (its new interpreter not yet spawned) has no pid to list
        supervised = {w["pid"] for w in serve_status(d.queue_directory)["workers"] if "pid" in w}
        extra = [pid for pid in _live_children(server) if pid not in supervised]
        if extra:
            break
        time.sleep(0.2)
    _serving(d)
    assert not extra, (f"workers forked by the fork server that the master does not supervise: {extra}, "
                       f"holding {[_sockets(pid) for pid in extra]} sockets; status: {serve_status(d.queue_directory)}")


def test_stop_ends_while_the_fork_server_is_stopped(daemon):
    """SIGTERM to the master while the fork server is stopped: the workers drain and
    exit (zombies of the stopped fork server), and serve must end within
    graceful_timeout plus the stop margin, not wait for the fork server for ever."""
    d = daemon(smtpd_workers=1, master_service_disable="qmgr", smtpd_listen=f"{HOST}:0", graceful_timeout="1s")
    server = serve_status(d.queue_directory)["fork_server"]
    os.kill(server, signal.SIGSTOP)
    try:
        d.proc.proc.send_signal(signal.SIGTERM)
        try:
            d.proc.proc.wait(30)  # graceful_timeout 1 s + STOP_MARGIN 15 s, with room
        except subprocess.TimeoutExpired:
            raise AssertionError("serve did not stop:\n" + "\n".join(d.proc.log[-10:])) from None
    finally:
        if _stat(server) is not None:
            os.kill(server, signal.SIGCONT)


# -- the client board ----------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 1])
def test_auth_failures_survive_a_reload(daemon, tmp_path, workers):
    d = daemon(smtpd_workers=workers, master_service_disable="qmgr", smtpd_listen=f"{HOST}:0",
               smtpd_timeout="300s", smtpd_sasl_auth_enable="yes", smtpd_tls_auth_only="no",
               smtpd_auth_failure_limit=2, smtpd_sasl_password_file=tmp_path / "sasl_passwd")
    added = subprocess.run([sys.executable, "-m", "trimail", "passwd", "add", "alice", "-c", str(d.config_path)],
                           check=False, input=b"correct horse\n", capture_output=True, timeout=60)
    assert added.returncode == 0, added.stderr
    wrong = b"AUTH PLAIN " + base64.b64encode(b"\0alice\0wrong")
    right = b"AUTH PLAIN " + base64.b64encode(b"\0alice\0correct horse")
    with socket.create_connection((HOST, d.port), timeout=10) as conn:
        assert conn.recv(4096).startswith(b"220")
        assert smtp_command(conn, b"EHLO client.example").startswith(b"250 ")
        for _ in range(2):  # the client's limit
            assert smtp_command(conn, wrong).startswith(b"535 5.7.8")
    old = set(_running(serve_status(d.queue_directory), "smtpd")) if workers else set()
    reloaded = trimail_cmd("reload", "-c", str(d.config_path), timeout=60)
    assert reloaded.returncode == 0, reloaded.stdout + reloaded.stderr
    if workers:  # the old generation has no session left: it is gone
        # a worker of the new generation that is still starting has no pid yet
        wait_until(lambda: not old & {w.get("pid") for w in serve_status(d.queue_directory)["workers"]}
                   and all(_stat(pid) is None or _stat(pid)[0] == "Z" for pid in old), timeout=30, interval=0.2)
    with socket.create_connection((HOST, d.port), timeout=10) as conn:
        assert conn.recv(4096).startswith(b"220")
        assert smtp_command(conn, b"EHLO client.example").startswith(b"250 ")
        assert smtp_command(conn, right).startswith(b"454 4.7.0"), "a third AUTH attempt was tried after a reload"
