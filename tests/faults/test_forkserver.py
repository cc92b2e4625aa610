"""The fork server (trimail.processes.forkserver) under faults: workers are forked
by it, not started with a new interpreter; when it is killed its workers die with
it and the master starts new ones the old way, losing nothing acknowledged; and a
SIGTERM to the whole process group (systemd's stop, a terminal's kill) is a
graceful stop: the fork server must not take its workers down with it.
"""

from __future__ import annotations

import os
import random
import signal
import smtplib
import socket
import subprocess
import time
from pathlib import Path

from tests.conftest import write_main_cf
from tests.faults.conftest import (
    assert_serving,
    banner,
    integrity_ok,
    queued,
    send,
    serve_status,
    wait_until,
)
from tests.faults.test_workers import _tokens
from tests.peers import Sink
from trimail.processes.forkserver import children_of

HOST = "127.0.31.1"
RELOAD_HOST = "127.34.1.1"  # the kill -9 during a reload: its serves and downstream


def _running(facts: dict) -> list[int]:
    return [w["pid"] for w in facts["workers"] if w.get("state") == "running"]


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(") ", 1)[1].split()[1])


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def _refused(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_workers_are_forked_by_the_fork_server(daemon):
    d = daemon(smtpd_workers=2)
    facts = serve_status(d.queue_directory)
    server = facts["fork_server"]
    assert isinstance(server, int) and _parent(server) == d.proc.proc.pid
    workers = _running(facts)
    assert len(workers) == 3  # the qmgr and two smtpd workers
    for pid in workers:
        assert _parent(pid) == server
        assert "trimail.processes.worker" not in _cmdline(pid)  # forked: serve's own command line
    send(d.port, ["rcpt@example.com"])
    assert_serving(d)


def test_a_killed_fork_server_takes_its_workers_and_serve_goes_on(daemon):
    d = daemon(smtpd_workers=2, master_service_disable="qmgr")
    send(d.port, ["before@example.com"])
    facts = serve_status(d.queue_directory)
    server, old = facts["fork_server"], set(_running(facts))
    os.kill(server, signal.SIGKILL)
    d.proc.wait_log(rf"fork server pid {server} exited")

    def replaced() -> bool:
        now = serve_status(d.queue_directory)
        return len(_running(now)) == 2 and not old & set(_running(now))

    wait_until(replaced, timeout=30)
    facts = serve_status(d.queue_directory)
    assert facts["fork_server"] is None
    for pid in _running(facts):
        assert "trimail.processes.worker" in _cmdline(pid)  # started with a new interpreter now
    send(d.port, ["after@example.com"])
    assert_serving(d)
    assert queued(d.queue_directory) == 2
    assert integrity_ok(d.queue_directory) == "ok"


def test_a_stop_while_the_fork_server_hangs_starts_no_worker(daemon):
    """A worker that died while the fork server does not answer is restarted through
    it, the master waiting up to its timeout (10 s) before it falls back to a new
    interpreter.  A stop in that wait must end the restart, not fall back: the stop
    has closed the listening sockets the new worker would be given (red team 19:
    "process trimail/smtpd could not be started: ValueError: bad value(s) in
    fds_to_keep").  Meanwhile status tells the restart's back-off ("waiting") from
    the start itself ("starting")."""
    d = daemon(smtpd_workers=2, master_service_disable="qmgr")
    facts = serve_status(d.queue_directory)
    server = facts["fork_server"]
    victim = next(w["pid"] for w in facts["workers"] if w["role"] == "smtpd")

    def restarting(state: str) -> bool:
        return any(w["role"] == "smtpd" and w["state"] == state and w["restarts"] == 1
                   for w in serve_status(d.queue_directory)["workers"])

    os.kill(server, signal.SIGSTOP)
    try:
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: restarting("starting"), timeout=10)  # past the back-off: asking the fork server
        assert d.proc.stop(signal.SIGTERM, timeout=60) == 0
    finally:
        try:
            os.kill(server, signal.SIGCONT)
        except ProcessLookupError:
            pass
    log = "\n".join(d.proc.log)
    assert f"fork server pid {server} did not answer" in log
    assert "could not be started" not in log, log
    assert "terminating on stop request" in log


def test_a_restart_waits_its_back_off_in_status(daemon):
    d = daemon(smtpd_workers=2, master_service_disable="qmgr")
    victim = next(w["pid"] for w in serve_status(d.queue_directory)["workers"] if w["role"] == "smtpd")
    os.kill(victim, signal.SIGKILL)
    seen: set[str] = set()

    def replaced() -> bool:
        facts = serve_status(d.queue_directory)
        states = [w["state"] for w in facts["workers"] if w["role"] == "smtpd"]
        seen.update(states)
        return states == ["running", "running"] and victim not in _running(facts)

    wait_until(replaced, timeout=20, interval=0.01)
    assert "waiting" in seen  # the 0.5 s back-off before the first restart
    assert_serving(d)


def test_sigterm_to_the_whole_process_group_drains_sessions(tmp_path, serve_process):
    """systemd stops a service by sending SIGTERM to every process in it: the fork
    server must outlive its workers, or they die (PR_SET_PDEATHSIG) with a
    transaction half done.  A session in DATA finishes its message and gets its
    250 (then 421); serve exits 0."""
    path = write_main_cf(tmp_path, smtpd_workers=1, master_service_disable="qmgr", smtpd_listen=f"{HOST}:0")
    serve = serve_process(path, new_session=True)
    with socket.create_connection((HOST, serve.port), timeout=30) as sock:
        sock.sendall(b"EHLO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        got = b""
        while b"354 " not in got:
            chunk = sock.recv(4096)
            assert chunk, f"closed before 354: {got!r}"
            got += chunk
        os.killpg(serve.proc.pid, signal.SIGTERM)
        wait_until(lambda: _refused(HOST, serve.port))  # the stop has begun: nothing new is accepted
        sock.sendall(b"Subject: group stop\r\n\r\nfinished in the grace period\r\n.\r\n")
        while b"queued as" not in got:
            chunk = sock.recv(4096)
            assert chunk, got
            got += chunk
        while chunk := sock.recv(4096):
            got += chunk
    assert b"421 4.3.2" in got  # closed once the transaction was done
    try:
        assert serve.proc.wait(30) == 0, "\n".join(serve.log[-20:])
    except subprocess.TimeoutExpired:
        raise AssertionError("serve did not stop:\n" + "\n".join(serve.log[-20:])) from None
    assert not [line for line in serve.log if "killed by signal" in line], serve.log[-20:]
    assert queued(tmp_path / "queue") == 1


def _port_of_its_own(host: str) -> int:
    """A free port for *host*, kept by every serve of one configuration (the next
    serve binds what the killed one's forks held)."""
    for port in random.sample(range(41000, 42000), 1000):
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port")


def _send_token(port: int, token: str) -> None:
    """One message to serve on RELOAD_HOST, acknowledged (``250``) or an error."""
    with smtplib.SMTP(RELOAD_HOST, port, timeout=30) as client:
        client.sendmail("alice@client.example", ["rcpt@example.com"], f"Subject: token {token}\r\n\r\nx\r\n")


def _live(pid: int) -> bool:
    """Not exited (a zombie has let go of all it held)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return not stat.read().rsplit(") ", 1)[1].startswith("Z")
    except OSError:
        return False


def test_a_master_killed_during_a_reload_leaves_no_fork_behind(daemon):
    """kill -9 to the master while a reload forks the new smtpd generation, each fork
    stopped (SIGSTOP: a debugger, an operator's job control) the moment it appears.
    A fork sets its own PR_SET_PDEATHSIG in its first milliseconds; one stopped before
    that outlived the master and the fork server for good (state T, parent 1),
    holding the queue lock and the listening socket: the next serve on the same
    configuration was refused ("another trimail serve uses this queue_directory").
    The test catches a fork that early in about 7 rounds of 10 (busy-polling the
    fork server's children), so it runs several rounds, each a new serve on the
    same configuration and queue; mail acknowledged in each is delivered in the end.
    Now the fork server, told of the master's death, kills what it forked first."""
    with Sink(host=RELOAD_HOST, port=_port_of_its_own(RELOAD_HOST)) as sink:
        params = {"smtpd_workers": 2, "smtpd_listen": f"{RELOAD_HOST}:{_port_of_its_own(RELOAD_HOST)}",
                  "relayhost": f"[{RELOAD_HOST}]:{sink.port}"}
        acknowledged: list[str] = []
        for round_ in range(5):
            d = daemon(**params)
            _send_token(d.port, str(round_))
            acknowledged.append(str(round_))
            server = serve_status(d.queue_directory)["fork_server"]
            before = set(children_of(server))
            os.kill(d.proc.proc.pid, signal.SIGHUP)
            stopped: list[int] = []
            deadline = time.monotonic() + 10
            try:
                while len(stopped) < 2 and time.monotonic() < deadline:  # no pause: a fork's first ms count
                    for pid in set(children_of(server)) - before - set(stopped):
                        os.kill(pid, signal.SIGSTOP)
                        stopped.append(pid)
                assert len(stopped) == 2, f"the reload forked {stopped}"
                d.proc.proc.kill()
                d.proc.proc.wait(10)
                try:
                    wait_until(lambda: not any(map(_live, stopped)), timeout=5)
                except AssertionError:
                    raise AssertionError(f"round {round_}: forks outlived the killed master: "
                                         f"{[pid for pid in stopped if _live(pid)]}") from None
            finally:
                for pid in stopped:  # what a failed round left
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        d = daemon(**params)
        _send_token(d.port, "last")
        acknowledged.append("last")
        wait_until(lambda: set(acknowledged) <= _tokens(sink.messages), timeout=30)
        assert banner(d.port, RELOAD_HOST).startswith("220 ")
    assert integrity_ok(d.queue_directory) == "ok"
