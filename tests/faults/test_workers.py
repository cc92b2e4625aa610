"""The process model under faults: workers killed under load are restarted by the
master and nothing acknowledged is lost (counted at the downstream); a reload
under load drops no session; the workers die with the master.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import signal
import smtplib
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Self

import pytest

from tests.faults.conftest import (
    assert_serving,
    banner,
    integrity_ok,
    queued,
    send,
    smtp_command,
    trimail_cmd,
    wait_until,
)
from tests.peers import Sink
from tests.ports import free_port as _free_port


def status(daemon) -> dict:
    result = trimail_cmd("status", "--json", "-c", str(daemon.config_path), timeout=30)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def running(daemon, role: str) -> list[int]:
    return [w["pid"] for w in status(daemon)["workers"] if w["role"] == role and w.get("state") == "running"]


def _tokens(messages) -> set[str]:
    found = set()
    for _, _, content in messages:
        for line in content.split(b"\r\n"):
            if line.startswith(b"Subject: token "):
                found.add(line.split(b" ", 2)[2].decode())
    return found


def _send_token(port: int, token: str) -> None:
    send(port, ["rcpt@example.com"], f"Subject: token {token}\r\n\r\nx\r\n".encode())


class Load:
    """Client threads sending numbered messages (*submit*: port, token; at most *each*
    a client); ``acknowledged`` holds the tokens of those that got their ``250``
    (only those must arrive)."""

    def __init__(self, port: int, clients: int = 8, submit: Callable[[int, str], None] = _send_token,
                 each: float = math.inf) -> None:
        self.port, self.submit, self.each = port, submit, each
        self.acknowledged: list[str] = []
        self.failures = 0
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(n,)) for n in range(clients)]

    def _run(self, client: int) -> None:
        number = 0
        while not self.stop.is_set() and number < self.each:
            number += 1
            token = f"c{client}-{number}"
            try:
                self.submit(self.port, token)
            except (OSError, smtplib.SMTPException, AssertionError) as exc:
                self.failures += 1
                self.errors.append(repr(exc))
                continue  # refused or cut: not acknowledged
            self.acknowledged.append(token)

    def __enter__(self) -> Self:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)


@pytest.mark.parametrize(("role", "workers", "clients"), [("smtpd", 2, 8), ("qmgr", 2, 8), ("smtpd", 1, 1)],
                         ids=["smtpd", "qmgr", "smtpd-lone-session"])
def test_killed_worker_is_restarted_and_nothing_acknowledged_is_lost(daemon, role, workers, clients):
    """smtpd-lone-session: one client and one worker, whose commits then run in its
    event loop (queue.solo), so the kill lands in or around one of them."""
    with Sink(delay=0.05) as sink:  # deliveries are in flight when the qmgr dies
        d = daemon(smtpd_workers=workers, relayhost=f"[127.0.0.1]:{sink.port}")
        before = running(d, role)
        assert len(before) == (workers if role == "smtpd" else 1)
        with Load(d.port, clients) as load:
            wait_until(lambda: len(load.acknowledged) >= 30, timeout=30)
            if role == "qmgr":  # the sink holds each message 50 ms: some are in delivery at the kill
                wait_until(lambda: queued(d.queue_directory, "active") > 0, timeout=30)
            victim = before[0]
            os.kill(victim, signal.SIGKILL)
            d.proc.wait_log(rf"warning: process trimail/{role} pid {victim} killed by signal 9")
            if role == "qmgr":  # its successor puts them back into incoming first, and says so
                d.proc.wait_log(r"trimail/qmgr\[\d+\]: recovered [1-9]\d* message\(s\) left active by an earlier run")
            wait_until(lambda: len(running(d, role)) == len(before) and victim not in running(d, role),
                       timeout=30)
            count = len(load.acknowledged)
            wait_until(lambda: len(load.acknowledged) >= count + 20, timeout=30)  # serving again
        wanted = set(load.acknowledged)
        wait_until(lambda: wanted <= _tokens(sink.messages), timeout=60)
        assert_serving(d)
        restarted = [w for w in status(d)["workers"] if w["role"] == role]
        assert sum(w["restarts"] for w in restarted) == 1
    assert integrity_ok(d.queue_directory) == "ok"


def test_mail_a_killed_smtpd_worker_committed_but_never_told_the_qmgr_about_is_delivered(daemon):
    """A worker killed between its commit and its wake-up of the qmgr (committed here by
    this test, as the worker would have, with no wake-up): the master wakes the qmgr
    when the worker exits, so the message does not wait for unrelated mail."""
    from trimail.queue.ids import new_queue_id
    from trimail.queue.spool import Spool
    from trimail.queue.store import NewMessage, Store

    with Sink() as sink:
        d = daemon(smtpd_workers=1, relayhost=f"[127.0.0.1]:{sink.port}")
        [victim] = running(d, "smtpd")
        store = Store.open(d.queue_directory)
        try:
            spool = Spool()
            spool.write(b"Subject: token committed-then-killed\r\n\r\nx\r\n")
            with store.transaction():
                store.insert_message(NewMessage(new_queue_id(), "a@client.example", ["r@far.example"], spool,
                                                state="incoming", protocol="ESMTP"))
        finally:
            store.close()
        os.kill(victim, signal.SIGKILL)
        d.proc.wait_log(rf"warning: process trimail/smtpd pid {victim} killed by signal 9")
        wait_until(lambda: "committed-then-killed" in _tokens(sink.messages), timeout=30)
        assert_serving(d)


def test_mail_whose_250_waits_behind_a_pipelined_quit_wakes_the_qmgr(daemon):
    """With QUIT pipelined behind the end of data, the 250 goes out only with the 221,
    as the session ends; the qmgr must still be woken for the message (it does not
    poll: a lost wake-up would leave the message waiting for unrelated mail)."""
    with Sink() as sink:
        d = daemon(smtpd_workers=1, relayhost=f"[127.0.0.1]:{sink.port}")
        with socket.create_connection(("127.0.0.1", d.port), timeout=10) as conn:
            assert conn.recv(4096).startswith(b"220")
            for command, code in ((b"EHLO client.example", b"250"), (b"MAIL FROM:<a@client.example>", b"250"),
                                  (b"RCPT TO:<r@far.example>", b"250"), (b"DATA", b"354")):
                assert smtp_command(conn, command).startswith(code)
            conn.sendall(b"Subject: token pipelined-quit\r\n\r\nx\r\n.\r\nQUIT\r\n")
            replies = b""
            while b"\r\n221" not in replies:
                chunk = conn.recv(4096)
                assert chunk, replies
                replies += chunk
            assert replies.startswith(b"250 ")
        wait_until(lambda: "pipelined-quit" in _tokens(sink.messages), timeout=30)
        assert_serving(d)


def test_worker_stopped_with_sigterm_is_restarted(daemon):
    d = daemon(smtpd_workers=1, master_service_disable="qmgr")
    [victim] = running(d, "smtpd")
    os.kill(victim, signal.SIGTERM)
    d.proc.wait_log(rf"warning: process trimail/smtpd pid {victim} exit status 0")
    wait_until(lambda: len(running(d, "smtpd")) == 1, timeout=30)
    assert_serving(d)
    send(d.port, ["rcpt@example.com"])


def test_reload_under_load_drops_no_session(daemon):
    """Sessions open in the old workers finish there; new ones reach the new
    generation; the old workers exit once their sessions are done."""
    with Sink() as sink:
        d = daemon(smtpd_workers=2, relayhost=f"[127.0.0.1]:{sink.port}", graceful_timeout="60s")
        old = set(running(d, "smtpd"))
        held = []
        for _ in range(6):  # sessions inside a transaction across the reload
            client = smtplib.SMTP("127.0.0.1", d.port, timeout=30)
            client.ehlo("client.example")
            assert client.mail("alice@client.example")[0] == 250
            held.append(client)
        with Load(d.port, clients=6) as load:
            wait_until(lambda: len(load.acknowledged) >= 20, timeout=30)
            result = trimail_cmd("reload", "-c", str(d.config_path))
            assert result.returncode == 0, result.stderr
            wait_until(lambda: not (set(running(d, "smtpd")) & old) and len(running(d, "smtpd")) == 2,
                       timeout=30)
            count = len(load.acknowledged)
            wait_until(lambda: len(load.acknowledged) >= count + 20, timeout=30)
        assert load.failures == 0, f"{load.failures} transactions failed across the reload: {load.errors[:3]}"
        for number, client in enumerate(held):  # the old workers still serve these
            assert client.rcpt("rcpt@example.com")[0] == 250
            code, _ = client.data(f"Subject: token held-{number}\r\n\r\nx\r\n".encode())
            assert code == 250
            client.quit()
        for pid in old:  # and leave once they are done
            wait_until(lambda pid=pid: not os.path.exists(f"/proc/{pid}") or _zombie(pid), timeout=30)
        wanted = set(load.acknowledged) | {f"held-{n}" for n in range(len(held))}
        wait_until(lambda: wanted <= _tokens(sink.messages), timeout=60)
        assert status(d)["reloads"] == 1


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1].startswith("Z")
    except OSError:
        return True


def test_workers_die_with_the_master_and_a_new_serve_starts(daemon, tmp_path):
    d = daemon(smtpd_workers=2, master_service_disable="qmgr")
    workers = running(d, "smtpd")
    send(d.port, ["rcpt@example.com"])
    d.proc.proc.send_signal(signal.SIGKILL)
    d.proc.proc.wait(30)
    for pid in workers:
        wait_until(lambda pid=pid: not os.path.exists(f"/proc/{pid}") or _zombie(pid), timeout=10)
    second = daemon(smtpd_workers=2, master_service_disable="qmgr")
    assert_serving(second)
    assert integrity_ok(second.queue_directory) == "ok"


def test_status_and_metrics_cover_every_worker(daemon):
    metrics_port = _free_port()
    d = daemon(smtpd_workers=2, master_service_disable="qmgr", metrics_listen=f"127.0.0.1:{metrics_port}")
    facts = status(d)
    assert facts["pid"] == d.proc.proc.pid
    roles = sorted(w["role"] for w in facts["workers"])
    assert roles == ["smtpd", "smtpd"]
    assert all(w["pid"] != facts["pid"] and w["uptime"] >= 0 for w in facts["workers"])
    human = trimail_cmd("status", "-c", str(d.config_path)).stdout
    assert human.count("smtpd worker") == 2, human
    for number in range(12):  # one at a time: the first worker takes them all (test_one_client_...)
        send(d.port, ["rcpt@example.com"], f"Subject: n{number}\r\n\r\nx\r\n".encode())
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    received = [line for line in body.splitlines() if line.startswith("trimail_messages_received_total ")]
    assert received == ["trimail_messages_received_total 12.0"], received
    assert 'trimail_queue_messages{state="incoming"} 12.0' in body
    served = {line.split("[")[1].split("]")[0] for line in d.proc.log if "trimail/smtpd[" in line and "client=" in line}
    assert served <= {str(w["pid"]) for w in facts["workers"]}


def _served_by(d, since: int = 0) -> collections.Counter:
    """smtpd pid -> connections it logged, in log lines from *since* on."""
    return collections.Counter(re.findall(r"trimail/smtpd\[(\d+)\]: connect from", "\n".join(d.proc.log[since:])))


def _hello(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("one.example")


def test_one_client_at_a_time_is_served_by_one_warm_worker(daemon):
    """Connections one after another all wake every worker; the session board gives
    the turn to one (net.listener.DeferredAccept), so they do not alternate between
    workers, each time waking one that was idle (before: exactly every other one)."""
    d = daemon(smtpd_workers=2, master_service_disable="qmgr")
    for number in range(40):
        send(d.port, ["rcpt@example.com"], f"Subject: n{number}\r\n\r\nx\r\n".encode())
    wait_until(lambda: sum(_served_by(d).values()) == 40)
    (_, most), *_ = _served_by(d).most_common()
    assert most >= 32, _served_by(d)


def _wake_ups(pid: int) -> int:
    """Context switches of every thread of *pid* so far: each time it slept and woke."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                total += int(line.split()[1])
    return total


def test_a_worker_with_nothing_to_do_is_not_woken_by_a_lone_clients_connections(daemon):
    """The worker whose turn it is not rests on the board's wake-up descriptor
    (trimail.processes.turns) instead of waking for every connection: at most a look
    every RECHECK (0.25 s), a few wake-ups each.  Before, every connection it saw
    cost it a deferral and a failed accept: about 250 wake-ups a second."""
    d = daemon(smtpd_workers=2, master_service_disable="qmgr")
    _hello(d.port)
    wait_until(lambda: sum(_served_by(d).values()) == 1)
    (warm, _), = _served_by(d).items()
    idle, = (pid for pid in running(d, "smtpd") if pid != int(warm))
    before, started, count = _wake_ups(idle), time.monotonic(), 0
    while count < 100 or time.monotonic() - started < 1.0:  # long enough for a rate
        _hello(d.port)
        count += 1
    woken, elapsed = _wake_ups(idle) - before, time.monotonic() - started
    wait_until(lambda: sum(_served_by(d).values()) == count + 1)
    # now and then the warm worker's last session is still counted when the client is
    # back, and the turn passes (and the other wakes) for a connection or two
    served = _served_by(d)
    assert served[warm] >= count - 5, served
    # a connection it serves costs it 10-16 wake-ups (its loop, commit and log threads;
    # measured): those are not what this is about (CI failed with 43 <= 40 for 754
    # connections, two or three served by the idle one); before, every connection woke it
    taken = sum(n for pid, n in served.items() if pid != warm)
    assert woken <= 20 + 20 * elapsed + 20 * taken, (woken, elapsed, count, served)


def test_a_stopped_worker_whose_turn_it_is_delays_a_connection_but_does_not_lose_it(daemon):
    d = daemon(smtpd_workers=2, master_service_disable="qmgr")
    _hello(d.port)
    wait_until(lambda: sum(_served_by(d).values()) == 1)
    (turn, _), = _served_by(d).items()
    mark = len(d.proc.log)
    os.kill(int(turn), signal.SIGSTOP)  # it keeps the turn (the board still says it is least busy)
    try:
        for _ in range(3):
            assert banner(d.port).startswith("220 ")
        wait_until(lambda: sum(_served_by(d, mark).values()) == 3)
        assert turn not in _served_by(d, mark)
    finally:
        os.kill(int(turn), signal.SIGCONT)
    assert_serving(d)


def test_concurrent_sessions_are_spread_over_the_workers(daemon):
    d = daemon(smtpd_workers=2, master_service_disable="qmgr", smtpd_timeout="300s")
    held = []
    try:
        for _ in range(10):  # each held open: the least busy worker takes the next
            conn = socket.create_connection(("127.0.0.1", d.port), timeout=10)
            held.append(conn)
            assert conn.recv(512).startswith(b"220 ")
        sessions = sorted(w["sessions"] for w in status(d)["workers"])
        assert sessions[0] >= 4 and sum(sessions) == 10, sessions
    finally:
        for conn in held:
            conn.close()


def test_start_refused_when_a_worker_fails(tmp_path):
    """An smtpd worker that exits before it is ready fails serve's start (exit 1,
    one fatal line), and nothing is left listening.  The worker is made to fail by
    a sitecustomize that replaces the smtpd worker's entry (whether it is forked by
    the fork server or started with a new interpreter, it runs that function)."""
    import subprocess
    import sys

    from tests.conftest import write_main_cf

    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import os\n"
        "import trimail.processes.worker as worker\n"
        "async def fail(*args):\n"
        "    os._exit(3)\n"
        "worker.run_smtpd = fail\n")
    port = _free_port()
    path = write_main_cf(tmp_path, smtpd_workers=1, master_service_disable="qmgr", smtpd_listen=f"127.0.0.1:{port}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hooks), *sys.path]))
    result = subprocess.run([sys.executable, "-m", "trimail", "serve", "-c", str(path)], check=False, capture_output=True,
                            text=True, timeout=60, env=env)
    assert result.returncode == 1, result.stderr
    assert "smtpd worker" in result.stderr and "did not start: exit status 3" in result.stderr, result.stderr
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
