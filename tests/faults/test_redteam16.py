"""Red team of the process model (issue 16): a real ``trimail serve`` with smtpd
workers, attacked the way an operator, a stuck process or a crash loop would.

Every test uses loopback addresses in 127.0.23.0/24.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import write_main_cf
from tests.faults.conftest import serve_status, trimail_cmd, wait_until
from tests.peers import Recorder, Sink
from tests.ports import free_port as _free_port

HOST = "127.0.23.1"


def _status(daemon) -> dict:
    result = trimail_cmd("status", "--json", "-c", str(daemon.config_path), timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def _smtpd(facts: dict) -> list[dict]:
    return [w for w in facts["workers"] if w["role"] == "smtpd"]


def _running(daemon) -> list[int]:
    return [w["pid"] for w in _smtpd(_status(daemon)) if w.get("state") == "running"]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return not stat.read().split(") ", 1)[1].startswith("Z")
    except OSError:
        return False


def _send(port: int, number: int) -> None:
    with smtplib.SMTP(HOST, port, timeout=30) as client:
        client.ehlo("client.example")
        assert client.mail("alice@client.example")[0] == 250
        assert client.rcpt("rcpt@example.com")[0] == 250
        assert client.data(f"Subject: n{number}\r\n\r\nx\r\n".encode())[0] == 250


def _scrape(port: int, timeout: float = 30) -> str:
    return urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=timeout).read().decode()


def _received(body: str) -> list[str]:
    return [line for line in body.splitlines() if line.startswith("trimail_messages_received_total ")]


@pytest.fixture
def stopped(request):
    """SIGSTOP a pid for the test; SIGCONT it whatever happens."""
    pids: list[int] = []

    def stop(pid: int) -> None:
        os.kill(pid, signal.SIGSTOP)
        pids.append(pid)

    yield stop
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def test_status_and_metrics_answer_while_a_worker_is_stuck(daemon, stopped):
    """A worker that does not answer its channel (SIGSTOP: a process stuck in a
    blocking call) must not make ``status`` say "not running" or the scrape come back
    empty: the master must give up on it well within the clients' 10 s bounds."""
    metrics_port = _free_port()
    d = daemon(smtpd_workers=2, master_service_disable="qmgr", smtpd_listen=f"{HOST}:0",
               metrics_listen=f"{HOST}:{metrics_port}")
    victim = _running(d)[0]
    stopped(victim)
    began = time.monotonic()
    facts = _status(d)  # "trimail: not running" (exit 1) when the master answers after the CLI's 10 s
    assert time.monotonic() - began < 8, "status waited out the stuck worker"
    states = {w["pid"]: w["state"] for w in _smtpd(facts)}
    assert states[victim] == "not answering", states
    began = time.monotonic()
    body = _scrape(metrics_port)  # empty reply: the 10 s request bound cut the scrape
    assert time.monotonic() - began < 8, "the scrape waited out the stuck worker"
    assert "trimail_queue_messages" in body


def test_a_worker_that_answers_late_is_not_answered_out_of_turn(daemon, stopped):
    """A request that timed out leaves its answer in the channel; the next request
    to that worker must not take it as its own (status, then metrics: the metrics
    request got the stale status object, and that worker's counters vanished from
    /metrics; every status after that read the previous request's answer)."""
    metrics_port = _free_port()
    d = daemon(smtpd_workers=2, master_service_disable="qmgr", smtpd_listen=f"{HOST}:0",
               metrics_listen=f"{HOST}:{metrics_port}")
    for number in range(12):  # spread over both workers by the kernel
        _send(d.port, number)
    assert _received(_scrape(metrics_port)) == ["trimail_messages_received_total 12.0"]
    victim = _running(d)[0]
    stopped(victim)
    _status(d)  # the master gives up on the victim's answer
    os.kill(victim, signal.SIGCONT)
    wait_until(lambda: victim in _running(d), timeout=10)  # one stale answer may be skipped, not more
    assert _received(_scrape(metrics_port)) == ["trimail_messages_received_total 12.0"]
    for _ in range(3):
        assert sorted(_running(d)) == sorted(w["pid"] for w in _smtpd(_status(d)))


def _crash_hook(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """An environment whose smtpd workers exit at once (status 3) while *flag* exists:
    a crash loop the test can start and end (the hook replaces the worker's entry,
    which the fork server calls in each worker it forks)."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    flag = tmp_path / "crash"
    slow = tmp_path / "slow"
    (hooks / "sitecustomize.py").write_text(
        "import os, time\n"
        "import trimail.processes.worker as worker\n"
        "start = worker.run\n"
        "def run(spec):\n"
        "    if spec['role'] == 'smtpd':\n"
        f"        if os.path.exists({str(flag)!r}):\n"
        "            os._exit(3)\n"
        f"        if os.path.exists({str(slow)!r}):\n"
        f"            open({str(tmp_path)!r} + '/started', 'w').close()\n"
        f"            time.sleep(float(open({str(slow)!r}).read() or 3))\n"
        "    start(spec)\n"
        "worker.run = run\n")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(hooks), *sys.path])), flag


def _crash_loop(serve, flag: Path) -> None:
    """Kill the smtpd worker(s) into a crash loop until the back-off reaches 4 s."""
    flag.touch()
    for pid in _pids_in_log(serve):
        os.kill(pid, signal.SIGKILL)
    serve.wait_log(r"trimail/smtpd: bad command startup -- throttling for 4s", timeout=30)
    flag.unlink()  # the next start succeeds


def _pids_in_log(serve) -> list[int]:
    result = trimail_cmd("status", "--json", "-c", str(serve.config_path), timeout=30)
    return [w["pid"] for w in json.loads(result.stdout)["workers"] if w.get("state") == "running"]


def test_stop_during_a_restart_back_off_ends_serve(tmp_path, serve_process):
    """``stop`` while a slot waits out its restart back-off: the slot must not start
    a worker after the wait (nobody tells that one to stop: serve hung until
    graceful_timeout + 15 s and then killed it, or for ever with a 30 s back-off)."""
    env, flag = _crash_hook(tmp_path)
    path = write_main_cf(tmp_path, smtpd_workers=1, master_service_disable="qmgr", smtpd_listen=f"{HOST}:0",
                         graceful_timeout="60s")
    serve = serve_process(path, env)
    serve.config_path = path
    _crash_loop(serve, flag)
    began = time.monotonic()
    serve.proc.send_signal(signal.SIGTERM)
    try:
        serve.proc.wait(20)
    except subprocess.TimeoutExpired:
        pytest.fail("serve did not stop within 20 s of SIGTERM:\n" + "\n".join(serve.log[-10:]))
    assert time.monotonic() - began < 20
    assert not any("did not stop: killed" in line for line in serve.log), serve.log[-10:]
    assert serve.proc.returncode == 0, "\n".join(serve.log[-20:])


def test_reload_during_a_restart_back_off_leaves_no_stray_worker(tmp_path, serve_process):
    """A reload while an old slot waits out its back-off retires that slot; it must
    not start a worker after the wait (one that nobody ever retires: a third smtpd
    worker for ever, on the old generation)."""
    env, flag = _crash_hook(tmp_path)
    path = write_main_cf(tmp_path, smtpd_workers=1, master_service_disable="qmgr", smtpd_listen=f"{HOST}:0")
    serve = serve_process(path, env)
    serve.config_path = path
    _crash_loop(serve, flag)
    result = trimail_cmd("reload", "-c", str(path))
    assert result.returncode == 0, result.stderr
    serve.wait_log(r"reload -- version")
    # past the old slot's 4 s back-off, and past the start of whatever it would start
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        workers = json.loads(trimail_cmd("status", "--json", "-c", str(path)).stdout)["workers"]
        assert [w["generation"] for w in workers] == [1], workers
        time.sleep(0.5)


def test_reload_while_a_worker_restarts_retires_it_too(tmp_path, serve_process):
    """A reload while an old slot's replacement worker is starting (not yet ready):
    once ready it must be told to retire like the rest of its generation (nobody
    told it: it served on, a stray worker of the old generation, for ever)."""
    env, _ = _crash_hook(tmp_path)
    path = write_main_cf(tmp_path, smtpd_workers=1, master_service_disable="qmgr", smtpd_listen=f"{HOST}:0")
    serve = serve_process(path, env)
    serve.config_path = path
    [victim] = _pids_in_log(serve)
    (tmp_path / "slow").touch()
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: (tmp_path / "started").exists(), timeout=20)  # the replacement is starting, slowly
    (tmp_path / "slow").unlink()  # the new generation starts at once
    result = trimail_cmd("reload", "-c", str(path))
    assert result.returncode == 0, result.stderr
    # the old slot is listed (generation 0) until its worker is gone: it must go once ready
    wait_until(lambda: [w["generation"] for w in json.loads(
        trimail_cmd("status", "--json", "-c", str(path)).stdout)["workers"]] == [1], timeout=20)


def test_concurrent_reloads_retire_every_older_generation(daemon):
    """SIGHUP and ``trimail reload`` at the same moment (the signal path does not go
    through the control socket's one-at-a-time lock): both reloads took the same
    "old" workers, so one new generation was never retired and ran for ever."""
    d = daemon(smtpd_workers=2, master_service_disable="qmgr", smtpd_listen=f"{HOST}:0")
    command = subprocess.Popen([sys.executable, "-m", "trimail", "reload", "-c", str(d.config_path)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    d.proc.proc.send_signal(signal.SIGHUP)
    assert command.wait(60) == 0
    wait_until(lambda: sum("reload -- version" in line for line in d.proc.log) == 2, timeout=60)
    wait_until(lambda: len([w for w in _status(d)["workers"]]) == 2, timeout=30)
    facts = _status(d)
    assert [w["generation"] for w in facts["workers"]] == [2, 2], facts["workers"]


def _sessions_by_worker(daemon) -> dict[int, int]:
    facts = serve_status(daemon.queue_directory)  # polled: the control socket, not an interpreter per look
    return {w["pid"]: w.get("sessions", 0) for w in _smtpd(facts) if w.get("state") == "running"}


def _open_until_both_workers_hold(daemon, each: int) -> dict[int, list[socket.socket]]:
    """Open sessions one at a time (each past its banner) until both smtpd workers
    hold at least *each*; which worker took which connection, from status."""
    held: dict[int, list[socket.socket]] = {pid: [] for pid in _sessions_by_worker(daemon)}
    for _ in range(24):
        if all(len(conns) >= each for conns in held.values()):
            return held
        before = _sessions_by_worker(daemon)
        conn = socket.create_connection((HOST, daemon.port), timeout=10)
        assert conn.recv(4096).startswith(b"220")
        grown: list[int] = []

        def one_grew(before: dict[int, int] = before, grown: list[int] = grown) -> bool:
            """The worker that took it (a status may be a moment behind)."""
            after = _sessions_by_worker(daemon)
            grown[:] = [pid for pid in after if after[pid] > before.get(pid, 0)]
            return len(grown) == 1

        wait_until(one_grew, timeout=10)
        held[grown[0]].append(conn)
    pytest.skip("the kernel gave (nearly) every connection to one worker")


def _gauge(body: str, name: str) -> list[str]:
    return [line for line in body.splitlines() if line.startswith(name + " ")]


def test_stress_gauge_is_one_across_workers(daemon):
    """Both workers under stress: /metrics says ``trimail_smtpd_stress 1`` (a 0/1
    gauge), not the sum of the workers' flags (2.0)."""
    metrics_port = _free_port()
    d = daemon(smtpd_workers=2, master_service_disable="qmgr", smtpd_listen=f"{HOST}:0",
               metrics_listen=f"{HOST}:{metrics_port}", smtpd_process_limit=40, smtpd_stress_threshold=5,
               smtpd_timeout="300s")  # held sessions idle: not the stress default of 10 s
    held = _open_until_both_workers_hold(d, 2)  # each worker's second session opened at >= 2 of 40: stress
    try:
        assert _status(d)["stress"] is True
        assert _gauge(_scrape(metrics_port), "trimail_smtpd_stress") == ["trimail_smtpd_stress 1.0"]
    finally:
        for conns in held.values():
            for conn in conns:
                conn.close()


def test_stress_ends_in_every_worker_when_the_sessions_end(daemon):
    """Stress mode is one state of the whole service: once every session is gone it
    must be off everywhere.  A worker whose own sessions closed while the other
    worker still held enough sessions keeps its stress flag for ever (status says
    stress, /metrics says 1, and that worker's next session gets the stress limits)."""
    metrics_port = _free_port()
    d = daemon(smtpd_workers=2, master_service_disable="qmgr", smtpd_listen=f"{HOST}:0",
               metrics_listen=f"{HOST}:{metrics_port}", smtpd_process_limit=40, smtpd_stress_threshold=5,
               smtpd_timeout="300s")  # held sessions idle: not the stress default of 10 s
    held = _open_until_both_workers_hold(d, 2)
    first, second = sorted(held, key=lambda pid: len(held[pid]))
    for pid in (first, second):  # one worker's sessions end while the other still holds >= 2
        for conn in held[pid]:
            conn.close()
        wait_until(lambda pid=pid: _sessions_by_worker(d)[pid] == 0, timeout=10)
    facts = _status(d)
    assert facts["sessions"] == 0
    assert facts["stress"] is False, facts
    assert _gauge(_scrape(metrics_port), "trimail_smtpd_stress") == ["trimail_smtpd_stress 0.0"]


class _Remote(Recorder):
    """A remote MTA that has the message once it has read the final dot (recorded
    then), and answers slowly: a delivery cut now is a message it already has."""

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        self.in_flight += 1
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        return "250 2.0.0 Ok: queued as REMOTE"


@pytest.mark.skipif(os.geteuid() != 0, reason="chroot needs root")
def test_reload_with_chroot_delivers_nothing_twice(tmp_path, serve_process):
    """With ``chroot = yes`` a reload replaces the qmgr worker (it could not re-read
    main.cf in its jail); the old one is stopped with its deliveries in flight, and
    the mail the remote already has is delivered again.  A single-process serve
    reconfigures its scheduler in place: a reload duplicates nothing there."""
    import pwd
    import shutil
    import tempfile

    nobody = pwd.getpwnam("nobody")
    assert nobody
    queue = Path(tempfile.mkdtemp(prefix="trimail-red16-", dir="/tmp"))
    sink = Sink(host=HOST)
    sink.recorder = _Remote(delay=3.0)
    sink.controller.handler = sink.recorder
    try:
        with sink:
            path = write_main_cf(tmp_path, smtpd_listen=f"{HOST}:0", queue_directory=str(queue), mail_owner="nobody",
                                 allow_root="no", chroot="yes", master_service_disable="", smtpd_workers=1,
                                 relayhost=f"[{HOST}]:{sink.port}", alias_maps="", alias_database="",
                                 local_recipient_maps="")
            serve = serve_process(path)
            for number in range(4):
                _send(serve.port, number)
            wait_until(lambda: sink.recorder.in_flight >= 1, timeout=30)
            result = trimail_cmd("reload", "-c", str(path))
            assert result.returncode == 0, result.stderr
            wanted = [f"Subject: n{n}".encode() for n in range(4)]
            wait_until(lambda: all(any(w in content for _, _, content in sink.messages) for w in wanted), timeout=60)
            wait_until(lambda: sink.recorder.in_flight == 0, timeout=30)
            subjects = sorted(line for _, _, content in sink.messages for line in content.split(b"\r\n")
                              if line.startswith(b"Subject: "))
            assert subjects == sorted(wanted), subjects
            assert serve.stop() == 0
    finally:
        shutil.rmtree(queue, ignore_errors=True)


def test_status_counts_the_sessions_of_a_worker_that_does_not_answer(daemon, stopped):
    """``status`` says how many sessions are open: a stuck worker's sessions are
    still open (and still count against smtpd_process_limit on the session board),
    so they are not left out of the total."""
    d = daemon(smtpd_workers=2, master_service_disable="qmgr", smtpd_listen=f"{HOST}:0")
    held = _open_until_both_workers_hold(d, 1)
    try:
        total = sum(len(conns) for conns in held.values())
        assert _status(d)["sessions"] == total
        stopped(next(iter(held)))
        assert _status(d)["sessions"] == total
    finally:
        for conns in held.values():
            for conn in conns:
                conn.close()


def test_sighup_during_stop_is_refused(daemon):
    """SIGHUP while serve drains its sessions for a stop: no new generation of
    workers (the listeners are closed: spawning one failed with "bad value(s) in
    fds_to_keep"), serve ends as the stop says, with a clean log."""
    d = daemon(smtpd_workers=2, master_service_disable="qmgr", smtpd_listen=f"{HOST}:0", graceful_timeout="3s")
    client = smtplib.SMTP(HOST, d.port, timeout=30)
    client.ehlo("client.example")
    assert client.mail("alice@client.example")[0] == 250  # busy: it keeps the stop draining
    try:
        d.proc.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: not _accepting(d.port), timeout=10)  # the stop has begun
        d.proc.proc.send_signal(signal.SIGHUP)
        assert d.proc.proc.wait(30) == 0, "\n".join(d.proc.log[-30:])
    finally:
        client.close()
    bad = [line for line in d.proc.log if any(word in line for word in ("Traceback", "error", "failed", "reload --"))]
    assert not bad, "\n".join(d.proc.log[-30:])


def _accepting(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=2).close()
    except OSError:
        return False
    return True


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become mail_owner")
def test_workers_that_dropped_root_die_with_the_master(tmp_path, serve_process):
    """PR_SET_PDEATHSIG is cleared when a process changes its uid: a worker that
    became mail_owner outlived a master killed with SIGKILL (it drained its
    sessions for graceful_timeout), kept the queue lock, and a new serve was
    refused ("another trimail serve (pid N) uses this queue_directory")."""
    import shutil
    import tempfile

    queue = Path(tempfile.mkdtemp(prefix="trimail-red16-", dir="/tmp"))
    try:
        path = write_main_cf(tmp_path, smtpd_listen=f"{HOST}:0", queue_directory=str(queue), mail_owner="nobody",
                             allow_root="no", smtpd_workers=2, master_service_disable="", graceful_timeout="60s",
                             alias_maps="", alias_database="", local_recipient_maps="")
        serve = serve_process(path)
        serve.config_path = path
        workers = _pids_in_log(serve)
        assert len(workers) == 3
        clients = []
        for _ in range(4):  # busy sessions: a draining worker would keep them for graceful_timeout
            client = smtplib.SMTP(HOST, serve.port, timeout=30)
            client.ehlo("client.example")
            assert client.mail("alice@client.example")[0] == 250
            clients.append(client)
        serve.proc.kill()
        serve.proc.wait(10)
        try:
            wait_until(lambda: not any(_alive(pid) for pid in workers), timeout=10)
        finally:
            for client in clients:
                client.sock.close()
        second = serve_process(path)
        assert second.proc.poll() is None
    finally:
        shutil.rmtree(queue, ignore_errors=True)


def _value(body: str, name: str) -> float:
    [line] = _gauge(body, name)
    return float(line.split()[1])


def test_counters_do_not_go_back_when_workers_leave(daemon):
    """A counter summed over processes must not fall when a worker exits (a reload
    retires a generation, a crash replaces a worker): Prometheus takes any fall for
    a reset and counts the surviving workers' totals again.  The counts of workers
    that are gone stay in the sum, as prometheus_client's multiprocess mode keeps them."""
    metrics_port = _free_port()
    d = daemon(smtpd_workers=2, master_service_disable="qmgr", smtpd_listen=f"{HOST}:0",
               metrics_listen=f"{HOST}:{metrics_port}")
    for number in range(12):
        _send(d.port, number)
    assert _value(_scrape(metrics_port), "trimail_messages_received_total") == 12.0
    old = set(_running(d))
    result = trimail_cmd("reload", "-c", str(d.config_path))
    assert result.returncode == 0, result.stderr
    wait_until(lambda: not any(_alive(pid) for pid in old), timeout=30)
    for number in range(12, 15):
        _send(d.port, number)
    assert _value(_scrape(metrics_port), "trimail_messages_received_total") == 15.0
    [victim] = _running(d)[:1]
    os.kill(victim, signal.SIGKILL)
    d.proc.wait_log(rf"pid {victim} killed by signal 9")
    assert _value(_scrape(metrics_port), "trimail_messages_received_total") >= 15.0


def test_status_answers_while_a_reload_waits_for_slow_workers(tmp_path, serve_process):
    """A reload whose new smtpd workers take long to start (a slow policy import,
    a big table, a loaded machine): ``trimail status`` meanwhile must not say
    "not running" (exit 1) about a serve that is running and serving."""
    env, _ = _crash_hook(tmp_path)
    path = write_main_cf(tmp_path, smtpd_workers=1, master_service_disable="qmgr", smtpd_listen=f"{HOST}:0")
    serve_process(path, env)
    (tmp_path / "slow").write_text("14")
    reload = subprocess.Popen([sys.executable, "-m", "trimail", "reload", "-c", str(path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: (tmp_path / "started").exists(), timeout=20)
        result = trimail_cmd("status", "--json", "-c", str(path), timeout=30)
        assert result.returncode == 0 and json.loads(result.stdout)["running"], result.stdout + result.stderr
    finally:
        reload.wait(60)
