"""Red team 30: a running ``trimail serve`` with workers, its fork server slow at the
wrong moment, and a stop that comes while a worker is starting.

Each test states what the rule (nothing outside one SMTP session ends or wedges
serve, nothing acknowledged with ``250`` is lost or delivered twice beyond what RFC
5321 permits, a control command does not hang) asks for; they were found failing on
70fd392 (a helper's attack, 90 minutes).  Downstream servers bind 127.0.0.7x only.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import apsw
import pytest

from tests.faults.conftest import integrity_ok, serve_status, wait_until
from tests.peers import Sink
from trimail.processes.supervisor import UNREADY_GRACE

SINK_HOST = "127.0.0.76"
LATE_FORK = re.compile(r"^clone3?\(.*= (\d+)", re.MULTILINE)  # strace's line for the fork server's (delayed) fork


def _mail(token: str) -> bytes:
    return f"Subject: token {token}\r\n\r\nbody\r\n".encode()


def _deliveries(sink: Sink) -> Counter[str]:
    """How many times the sink accepted each token."""
    found: Counter[str] = Counter()
    for _, _, content in list(sink.messages):
        for line in content.split(b"\r\n"):
            if line.startswith(b"Subject: token "):
                found[line.split(b" ", 2)[2].decode()] += 1
    return found


def _submit(port: int, token: str) -> bool:
    """One message; whether it was acknowledged with 250."""
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo("client.example")
            client.mail("alice@client.example")
            client.rcpt("r@far.example")
            return client.data(_mail(token))[0] == 250
    except (OSError, smtplib.SMTPException):
        return False


def _states(queue_directory: Path) -> dict[str, int]:
    db = apsw.Connection(str(queue_directory / "queue.db"), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return dict(db.execute("SELECT state, count(*) FROM message GROUP BY state").fetchall())
    finally:
        db.close()


def _children(pid: int) -> set[int]:
    try:
        return {int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except OSError:
        return set()


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(") ", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


# -- a fork that comes late ----------------------------------------------------------------


@pytest.mark.skipif(shutil.which("strace") is None or os.geteuid() != 0,
                    reason="makes the fork server's fork slow with strace (ptrace): needs strace and root")
def test_a_qmgr_forked_late_does_not_take_the_running_qmgrs_mail(daemon, tmp_path):
    """The qmgr worker dies (OOM killer) and the fork server is slow to fork its
    replacement (a frozen cgroup, memory pressure; here strace delays its ``clone`` by
    12 s): it had read the request before its deadline, so it forks anyway, after the
    master gave up at 10 s and started a qmgr B with a new interpreter.  The late
    child A runs ``run_qmgr``, whose first act is ``recover()``: every ``active``
    message -- B's deliveries in flight -- goes back to ``incoming``; then A's own
    first round claims mail, and only then does A find its channel closed (``lost the
    master's channel``) and die of a broken pipe without returning what it claimed.
    Found (clients submitting meanwhile, the downstream holding DATA until A is gone): 20
    of 931 acknowledged messages delivered twice (B claimed again what A had put back, and
    delivered it beside its own attempt in flight; ``delivery worker ... failed:
    KeyError``), and 10 acknowledged messages left ``active`` by the dead A: no
    running qmgr ever claims them, so they are not delivered until serve restarts.
    The architecture says "a fork that comes late finds its channel closed and
    exits": a qmgr must not touch the queue before it knows it is the one the master
    started (e.g. wait for the master's first word on the channel, or check the
    channel, before ``recover``; or the fork server re-checks the deadline in the
    child before it runs the worker)."""
    with Sink(host=SINK_HOST, held=True) as sink:
        d = daemon(smtpd_workers=1, relayhost=f"[{SINK_HOST}]:{sink.port}")
        facts = serve_status(d.queue_directory)
        fork_server = facts["fork_server"]
        [qmgr] = [w["pid"] for w in facts["workers"] if w["role"] == "qmgr"]
        acknowledged: list[str] = []
        for n in range(3):
            assert _submit(d.port, f"first-{n}")
            acknowledged.append(f"first-{n}")
        wait_until(lambda: sink.recorder.in_flight == 3, timeout=10)  # the qmgr's deliveries, held at DATA

        trace = tmp_path / "strace.out"
        tracer = subprocess.Popen(["strace", "-qq", "-o", str(trace), "-p", str(fork_server),
                                   "-e", "trace=clone,clone3", "-e", "inject=clone,clone3:delay_enter=12000000"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: trace.exists(), timeout=10)
            os.kill(qmgr, signal.SIGKILL)
            d.proc.wait_log(rf"process trimail/qmgr pid {qmgr} killed by signal 9")
            stop = threading.Event()

            def client(k: int) -> None:
                n = 0
                while not stop.is_set():
                    n += 1
                    if _submit(d.port, f"c{k}-{n}"):
                        acknowledged.append(f"c{k}-{n}")

            d.proc.wait_log(r"fork server pid \d+ did not answer", timeout=20)  # B starts now; A forks in 2 s
            clients = [threading.Thread(target=client, args=(k,)) for k in range(2)]
            for thread in clients:
                thread.start()
            try:
                # the late fork: strace logs the clone's result once it is done
                wait_until(lambda: LATE_FORK.search(trace.read_text()) is not None, timeout=20)
                late = int(LATE_FORK.search(trace.read_text()).group(1))
                wait_until(lambda: _gone(late), timeout=20)
            finally:
                stop.set()
                for thread in clients:
                    thread.join()
        finally:
            tracer.terminate()
            tracer.wait()
        sink.release()

        def settled() -> bool:
            """Everything delivered, or what is not sits ``active`` and nothing else is queued."""
            missing = set(acknowledged) - set(_deliveries(sink))
            states = _states(d.queue_directory)
            return not missing or (set(states) == {"active"} and states["active"] == len(missing))

        wait_until(settled, timeout=30)
        try:  # a bounded wait for a negative: the qmgr finishing its last deliveries takes milliseconds
            wait_until(lambda: set(acknowledged) <= set(_deliveries(sink)), timeout=5)
        except AssertionError:
            pass
        delivered = _deliveries(sink)
        missing = sorted(set(acknowledged) - set(delivered))
        twice = sorted(token for token, count in delivered.items() if count > 1)
        assert not missing and not twice, (
            f"{len(acknowledged)} acknowledged: {len(missing)} never delivered {missing[:5]} "
            f"(queue: {_states(d.queue_directory)}), {len(twice)} delivered twice {twice[:5]}; log:\n"
            + "\n".join(line for line in d.proc.log if re.search(r"qmgr\[\d+\]: (recovered|warning: lost|fatal)", line)))
    assert integrity_ok(d.queue_directory) == "ok"


# -- a stop while a worker is starting ---------------------------------------------------------


def _stop_a_starting_worker(d, fork_server: int) -> int:
    """Kill the smtpd worker and SIGSTOP its replacement as the fork server forks it,
    before it reports ready (status: ``starting``); its pid."""
    for _ in range(5):
        [victim] = [w["pid"] for w in serve_status(d.queue_directory)["workers"]
                    if w["role"] == "smtpd" and w.get("state") == "running"]
        before = _children(fork_server)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        fresh: set[int] = set()
        while not fresh and time.monotonic() < deadline:
            fresh = _children(fork_server) - before - {victim}
        assert fresh, "no replacement was forked"
        [new] = fresh
        os.kill(new, signal.SIGSTOP)
        states = [w.get("state") for w in serve_status(d.queue_directory)["workers"] if w["role"] == "smtpd"]
        if states == ["starting"]:
            return new
        os.kill(new, signal.SIGCONT)  # it had said ready already: try again
        wait_until(lambda: [w.get("state") for w in serve_status(d.queue_directory)["workers"]
                            if w["role"] == "smtpd"] == ["running"], timeout=10)
    pytest.fail("could not catch a worker before it reported ready")


def test_stop_while_a_worker_is_starting_ends_serve_within_its_bound(daemon):
    """``trimail stop`` while an smtpd worker is starting (forked, not yet ready: here
    SIGSTOP, as a frozen or starved process) must end serve within ``graceful_timeout``
    + 15 s (docs/architecture.md: "SIGKILL after graceful_timeout + 15 s").  Found:
    serve ended 65 s after the stop whatever ``graceful_timeout`` says, and ``trimail
    stop`` itself gave up first: ``trimail: fatal: serve did not stop within 60s``
    (exit 1).  ``Master._retire`` kills only ``slot.worker``, which ``_run_one`` sets
    when the worker is ready; until then ``became_ready`` waits its whole
    ``START_TIMEOUT`` (60 s) and then 5 s more, deaf to the stop."""
    d = daemon(smtpd_workers=1, master_service_disable="qmgr", graceful_timeout="1s")
    fork_server = serve_status(d.queue_directory)["fork_server"]
    assert fork_server
    stopped = _stop_a_starting_worker(d, fork_server)
    _stops_within_bound(d, stopped, f"worker pid {stopped} is starting, stopped")


def test_a_stop_during_a_reload_whose_new_worker_hangs_ends_serve_soon(daemon):
    """Red team 30, from reading the code: SIGHUP's reload ran inside the signal loop,
    and the stop waited for any reload begun; a reload whose new smtpd worker never
    reported ready (frozen) held a SIGTERM for the whole start timeout (60 s).  Now a
    stop cancels a reload in progress (its changes undone).  Its new worker: if the
    fork server had not yet answered, it is killed when the answer comes; if it had,
    the worker is not ready and gets SIGKILL ``UNREADY_GRACE`` after its SIGTERM.  (The
    second case took graceful_timeout + 15 s, 16 s here: 1 run in 4 under load.)"""
    d = daemon(smtpd_workers=1, master_service_disable="qmgr", graceful_timeout="1s")
    fork_server = serve_status(d.queue_directory)["fork_server"]
    before = _children(fork_server)
    d.proc.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    fresh: set[int] = set()
    while not fresh and time.monotonic() < deadline:
        fresh = _children(fork_server) - before
    assert fresh, "the reload forked no new worker"
    [new] = fresh
    os.kill(new, signal.SIGSTOP)  # the new generation's worker never reports ready
    # (the reload is under way: only a reload forks a worker here)
    _stops_within_bound(d, new, f"the reload's new worker pid {new} is stopped")


def _stops_within_bound(d, stopped: int, what: str) -> None:
    """SIGTERM (``trimail stop`` does the same through the control socket): serve must
    end within ``UNREADY_GRACE`` (5 s: a worker never ready has no session to drain, and
    gets SIGKILL then) and 5 s of slack for a loaded machine, well before graceful_timeout
    (1 s) + 15 s; *stopped* (SIGSTOPped) is let go after."""
    try:
        began = time.monotonic()
        d.proc.proc.send_signal(signal.SIGTERM)
        try:
            d.proc.proc.wait(timeout=UNREADY_GRACE + 5)
        except subprocess.TimeoutExpired:
            pytest.fail(f"serve still running {time.monotonic() - began:.0f} s after the stop "
                        f"(graceful_timeout 1 s); {what}; log:\n" + "\n".join(d.proc.log[-12:]))
    finally:
        try:
            os.kill(stopped, signal.SIGCONT)
        except ProcessLookupError:
            pass


# -- the failure counter's labels ------------------------------------------------------------


def _metrics_port(d) -> int:
    line = d.proc.wait_log(r"metrics endpoint listening on")
    return int(re.search(r"listening on .*?:(\d+)", line).group(1))


def _failure_series(port: int) -> list[str]:
    import urllib.request

    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    return [line for line in body.splitlines() if line.startswith("trimail_task_failures_total{")]


def test_failed_status_records_add_no_metrics_series_per_message(daemon):
    """docs/operations.md: when another process holds the queue's write lock (a long
    ``queue delete --all``, an operator's sqlite3 shell) or the disk is full, the
    qmgr's writes fail and "outcomes [are] retried".  Each such failure is counted
    in ``trimail_task_failures_total{task}`` -- with the task named after the message:
    ``task="ID: recording delivery status"`` (scheduler/results.py ``record``;
    likewise ``ID: delivery to ROUTE`` in scheduler/qmgr.py ``job_failed`` and ``ID:
    scheduling`` in scheduler/dispatch.py).  Every message caught by such an episode
    adds a time series that is never removed: the qmgr's registry, the master's sum
    of departed workers (``_departed``, kept for ever so that no counter falls) and
    every scrape grow with the number of messages ever affected, without bound (and
    past 16 MiB the qmgr's metrics answer no longer fits the channel's line).
    Found: 20 messages delivered while the lock was held for a few seconds left 20
    series (the smtpd side counts its failures as ``task="smtpd session"``)."""
    with Sink(host=SINK_HOST, held=True) as sink:
        d = daemon(smtpd_workers=1, relayhost=f"[{SINK_HOST}]:{sink.port}", metrics_listen="127.0.0.1:0",
                   queue_busy_timeout="1s", initial_destination_concurrency=20)
        port = _metrics_port(d)
        tokens = [f"m{n}" for n in range(20)]
        for token in tokens:
            assert _submit(d.port, token)
        wait_until(lambda: sink.recorder.in_flight == len(tokens), timeout=20)  # all claimed, held at DATA
        holder = apsw.Connection(str(d.queue_directory / "queue.db"))
        holder.set_busy_timeout(10_000)
        holder.execute("BEGIN IMMEDIATE")  # the operator's shell holds the write lock
        try:
            sink.release()
            d.proc.wait_log(r"recording delivery status failed: .*locked", timeout=20)
            wait_until(lambda: len(_deliveries(sink)) == len(tokens), timeout=20)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        wait_until(lambda: _states(d.queue_directory) == {}, timeout=60)  # every outcome recorded at last
        series = _failure_series(port)
        per_message = [line for line in series if re.search(r'task="[0-9A-Za-z]{12,}: ', line)]
        assert not per_message, f"{len(per_message)} of {len(series)} failure series are named after a message:\n" \
            + "\n".join(per_message[:5])


def test_a_command_serve_took_and_did_not_answer_in_time_is_not_not_running(tmp_path):
    """Red team 30: ``trimail reload`` gave up after 30 s on a reload that waited for a
    starting worker, and said "serve is not running".  A control socket that took the
    command and did not answer in time is a running serve: the CLI says so."""
    from trimail.net.control import CONTROL_NAME, send_command

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / CONTROL_NAME))
    listener.listen(1)
    try:
        answer = send_command(tmp_path, "reload", timeout=0.5)  # taken into the backlog, never answered
    finally:
        listener.close()
    assert answer is not None and answer.startswith("error: serve took 'reload' and did not answer within"), answer
    assert send_command(tmp_path, "reload", timeout=0.5) is None  # nobody listens: not running
