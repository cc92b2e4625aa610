"""Red team 29: a running ``trimail serve`` (smtpd workers, and one process where it
matters) against an operator's main.cf edits, signals, the queue's shared-memory
file and a low descriptor limit.

Each test states what the rule (nothing outside one SMTP session ends or wedges
serve, nothing acknowledged with ``250`` is lost) asks for; they were found
failing on 01b0a42.  Downstream servers bind 127.0.0.6x only.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import subprocess
import urllib.request

import pytest

from tests.faults.conftest import (
    assert_serving,
    banner,
    connectable,
    integrity_ok,
    process_tree,
    send,
    serve_status,
    wait_until,
)
from tests.peers import Sink
from tests.ports import free_port as _free_port

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


# -- the running configuration is not what a replacement worker runs -----------------


def test_a_worker_restarted_after_main_cf_was_edited_commits_into_the_running_queue(daemon, tmp_path):
    """The operator has edited main.cf (a new queue_directory for a migration planned for
    the next restart) and not reloaded.  An smtpd worker then dies (crash, OOM killer):
    its replacement read main.cf again (processes/worker.py ``run``:
    ``configuration.load(spec["config"], ...)``) and committed into the other
    directory, where no qmgr looks and no lock is held: its mail was acknowledged and
    never delivered (found: 4 of 20 messages stranded with two workers).  Now it
    loads the master's text of main.cf."""
    with Sink(host=SINK_HOST) as sink:
        d = daemon(smtpd_workers=1, relayhost=f"[{SINK_HOST}]:{sink.port}")
        send(d.port, ["r@far.example"], _mail("before"))
        wait_until(lambda: "before" in _tokens(sink), timeout=30)
        elsewhere = tmp_path / "queue-next"
        elsewhere.mkdir()
        text = d.config_path.read_text()
        d.config_path.write_text(re.sub(r"(?m)^queue_directory = .*$", f"queue_directory = {elsewhere}", text))
        _replace_worker(d)
        send(d.port, ["r@far.example"], _mail("after-restart"))
        wait_until(lambda: "after-restart" in _tokens(sink), timeout=30)
        assert not (elsewhere / "queue.db").exists()
    assert integrity_ok(d.queue_directory) == "ok"


@pytest.mark.parametrize("workers", [1, 0])
def test_a_reload_that_changes_queue_directory_strands_no_acknowledged_mail(daemon, tmp_path, workers):
    """SIGHUP with a new queue_directory: the new smtpd generation opened the new
    queue (processes/reload.py checked nothing about it), the qmgr stayed on the old
    one (its writer was opened at start), and ``trimail status``/``stop`` looked for
    the control socket in the new directory ("not running").  In one process the
    writer stayed on the old queue, so mail flowed there; with workers it was
    acknowledged into a queue no process serves.  Now the reload is refused (it
    takes a stop and a start, as in Postfix), in both modes."""
    with Sink(host=SINK_HOST) as sink:
        d = daemon(smtpd_workers=workers, relayhost=f"[{SINK_HOST}]:{sink.port}")
        elsewhere = tmp_path / "queue-next"
        elsewhere.mkdir()
        text = d.config_path.read_text()
        d.config_path.write_text(re.sub(r"(?m)^queue_directory = .*$", f"queue_directory = {elsewhere}", text))
        os.kill(d.proc.proc.pid, signal.SIGHUP)
        d.proc.wait_log(r"reload refused, keeping the running configuration: queue_directory cannot change")
        wait_until(lambda: _greets(d.port), timeout=30)
        send(d.port, ["r@far.example"], _mail("after-reload"))
        wait_until(lambda: "after-reload" in _tokens(sink), timeout=30)
        assert serve_status(d.queue_directory)["pid"] == d.proc.proc.pid  # the control socket is where it was
        assert not (elsewhere / "queue.db").exists()
    assert integrity_ok(d.queue_directory) == "ok"


def test_a_refused_reload_keeps_the_running_configuration_for_restarted_workers(daemon):
    """``reload refused, keeping the running configuration`` -- but it was kept only
    until a worker died: its replacement read the broken main.cf, exited, and was
    retried with back-off for as long as the file stayed broken.  With every smtpd worker
    gone the master's listening socket still completes handshakes into its backlog,
    so clients hung without a greeting instead of being refused.  Now every worker
    loads the text the master runs (processes.reload.text_memfd)."""
    with Sink(host=SINK_HOST) as sink:
        d = daemon(smtpd_workers=1, relayhost=f"[{SINK_HOST}]:{sink.port}")
        with d.config_path.open("a") as main_cf:
            main_cf.write("smtpd_recipient_restrictions = reject_no_such_restriction\n")
        os.kill(d.proc.proc.pid, signal.SIGHUP)
        d.proc.wait_log(r"reload refused, keeping the running configuration")
        [victim] = _running(d, "smtpd")
        os.kill(victim, signal.SIGKILL)
        d.proc.wait_log(rf"warning: process trimail/smtpd pid {victim} killed by signal 9")
        wait_until(lambda: _greets(d.port), timeout=30)
        send(d.port, ["r@far.example"], _mail("after-refused-reload"))
        wait_until(lambda: "after-refused-reload" in _tokens(sink), timeout=30)
        assert_serving(d)


def test_the_control_socket_bound_again_does_not_cut_a_reload_in_half(daemon):
    """``trimail reload`` is running (its new smtpd generation starting: here the fork
    server is slow, SIGSTOP) when the control socket file is removed (the clean-up
    that ``_keep_path`` exists for).  ``_keep_path`` binds it again and cancels the
    old listener's scope -- with the request in flight inside it
    (net/control.py ``scope.cancel()``): ``apply_reload`` was cancelled in
    ``_start_slots``, after it had set ``master.config`` and ``master.main_cf`` to the
    new text and registered the new listener, with no roll-back (it rolls back on
    ``WorkerStartError`` only).  Found: the client got no answer, the new address
    stayed bound by the master with no worker accepting on it (clients complete the
    handshake and hang without a greeting), ``trimail status`` lists it as listening,
    the old generation runs on with the old configuration, and the previous main.cf
    memfd leaks (red team 29b).  Now the old listener only stops accepting: its
    requests in flight run to their end."""
    d = daemon(smtpd_workers=1)
    new_port = _free_port("127.0.0.1")
    text = d.config_path.read_text()
    d.config_path.write_text(re.sub(r"(?m)^smtpd_listen = (.*)$", rf"smtpd_listen = \1, 127.0.0.1:{new_port}", text))
    fork_server = serve_status(d.queue_directory)["fork_server"]
    assert fork_server
    path = d.queue_directory / "control"
    os.kill(fork_server, signal.SIGSTOP)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(path))
            client.sendall(b"reload\n")
            wait_until(lambda: connectable(new_port), timeout=20)  # the reload opened it: now in _start_slots
            path.unlink()
            d.proc.wait_log(r"control socket .*control was removed or replaced: bound again", timeout=20)
            client.settimeout(30)
            answer = b""
            while chunk := client.recv(4096):
                answer += chunk
    finally:
        os.kill(fork_server, signal.SIGCONT)
    wait_until(lambda: _greets(new_port), timeout=30)  # the address the reload opened is served
    assert answer.strip(), "the reload's client got no answer: the request was cancelled mid-reload"
    assert_serving(d)


# -- the queue's shared-memory file -------------------------------------------------------


def _metrics_port(d) -> int:
    line = d.proc.wait_log(r"metrics endpoint listening on")
    return int(re.search(r"listening on .*?:(\d+)", line).group(1))


def test_a_truncated_wal_index_does_not_end_serve(daemon):
    """``queue.db-shm`` truncated to zero (an operator's clean-up, a compromised
    mail_owner: the queue directory is its own) while serve runs: every process that
    has it mapped takes SIGBUS at its next touch.  The workers are restarted (their
    replacements extend the file again), but the master read the queue gauges through
    its own connection: a scrape of /metrics before that killed the master with no
    log line, and its workers with it.  Now a worker reads them for the master.
    (In one process the next message still ends serve: docs/operations.md.)"""
    with Sink(host=SINK_HOST) as sink:
        d = daemon(smtpd_workers=2, relayhost=f"[{SINK_HOST}]:{sink.port}", metrics_listen="127.0.0.1:0")
        port = _metrics_port(d)
        send(d.port, ["r@far.example"], _mail("before"))
        wait_until(lambda: "before" in _tokens(sink), timeout=30)
        os.truncate(d.queue_directory / "queue.db-shm", 0)
        for _ in range(2):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
            except OSError:
                pass
            try:
                send(d.port, ["r@far.example"], _mail("after"))
            except Exception:  # noqa: BLE001 - a session cut by its worker's SIGBUS: not acknowledged
                pass
        assert _still_running(d), f"serve exited, status {d.proc.proc.returncode}:\n" + "\n".join(d.proc.log[-20:])
        wait_until(lambda: _greets(d.port), timeout=30)
        send(d.port, ["r@far.example"], _mail("later"))
        wait_until(lambda: "later" in _tokens(sink), timeout=30)


def test_a_removed_wal_index_starts_no_worker_that_would_lose_mail(daemon):
    """``queue.db-shm`` removed while serve runs: the running processes keep the
    unlinked one mapped; a worker that started afterwards (any crash) made a new
    one, so its commits were indexed where the others never look.  Found: messages
    acknowledged by the replacement worker were never delivered, ``trimail queue
    list`` failed with ``disk I/O error``, and after ``trimail stop`` the queue was
    empty and ``integrity_check`` ok -- the two acknowledged messages were gone.
    Now the master starts no worker while the index is not the one it maps
    (processes.spawn.check_queue_index): the other smtpd worker and the qmgr go on,
    and a new serve starts clean."""
    with Sink(host=SINK_HOST) as sink:
        d = daemon(smtpd_workers=2, relayhost=f"[{SINK_HOST}]:{sink.port}")
        send(d.port, ["r@far.example"], _mail("before"))
        wait_until(lambda: "before" in _tokens(sink), timeout=30)
        os.remove(d.queue_directory / "queue.db-shm")
        [victim, *_] = _running(d, "smtpd")
        os.kill(victim, signal.SIGKILL)
        d.proc.wait_log(r"warning: process trimail/smtpd could not be started: .*queue.db-wal or -shm was removed or "
                        r"replaced while serve runs")
        acknowledged = []
        for n in range(5):
            send(d.port, ["r@far.example"], _mail(f"after-{n}"))
            acknowledged.append(f"after-{n}")
        wait_until(lambda: set(acknowledged) <= _tokens(sink), timeout=60)
        assert victim not in _running(d, "smtpd") and len(_running(d, "smtpd")) == 1
        d.proc.stop()
        again = daemon(smtpd_workers=2, relayhost=f"[{SINK_HOST}]:{sink.port}")
        send(again.port, ["r@far.example"], _mail("restarted"))
        wait_until(lambda: "restarted" in _tokens(sink), timeout=30)
    assert integrity_ok(d.queue_directory) == "ok"


# -- signals ------------------------------------------------------------------------------


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
    for pid in process_tree(d.proc.proc.pid):
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


# -- a low descriptor limit ------------------------------------------------------------------


def test_idle_connections_holding_every_descriptor_turn_stress_on(daemon):
    """serve raises the soft RLIMIT_NOFILE to the hard one; where the hard limit is low
    (96 here, set on the running workers) the workers run out of descriptors long
    before smtpd_process_limit (1000) is near, so stress mode (80 % of the process
    limit) never came: ~190 idle connections held every descriptor of both workers,
    ``"stress": false``, and a real client waited in the backlog until it gave up --
    for as long as the idle clients care to stay (smtpd_timeout, 300 s, renewed by
    reconnecting).  Now EMFILE at accept turns stress on in the worker (anvil:
    ``out_of_descriptors``), and its idle sessions are cut after 10 s."""
    d = daemon(smtpd_workers=2, smtpd_client_connection_count_limit=0, smtpd_client_connection_rate_limit=0,
               smtpd_timeout="${stress?{2}:{300}}s")  # stress cuts idle sessions after 2 s (10 by default)
    for pid in _running(d, "smtpd"):
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (96, 96))
    idle: list[socket.socket] = []
    try:
        for _ in range(250):
            idle.append(socket.create_connection(("127.0.0.1", d.port), timeout=10))
        wait_until(lambda: serve_status(d.queue_directory)["sessions"] >= 100, timeout=30)
        greeting = banner(d.port, timeout=40)  # stress: idle sessions are cut after 2 s
        assert greeting.startswith("220 "), greeting
        d.proc.wait_log(r"out of file descriptors at \d+ sessions of this process \(RLIMIT_NOFILE 96\)")
        d.proc.wait_log(r"warning: stress mode on: ")
    finally:
        for sock in idle:
            sock.close()


# -- the delivery metrics ---------------------------------------------------------------------


def test_a_destination_whose_last_delivery_worker_ended_leaves_no_metrics_label(daemon):
    """``trimail_destination_connections{destination=...}`` was made for every route
    ever delivered to and never removed (scheduler/workers.py), although the
    destination itself is forgotten: on an outbound gateway, months of distinct
    destinations grow the exposition without bound (100,000: 9.6 MB, a second of
    the qmgr's event loop per scrape) until the qmgr's answer no longer fits the
    master's channel.  Now the label goes with the destination's last worker."""
    with Sink(host=SINK_HOST) as sink:
        d = daemon(smtpd_workers=1, relayhost=f"[{SINK_HOST}]:{sink.port}", smtp_connection_cache_time_limit="1s",
                   metrics_listen="127.0.0.1:0")
        line = d.proc.wait_log(r"metrics endpoint listening on")
        metrics_port = int(re.search(r"listening on .*?:(\d+)", line).group(1))
        send(d.port, ["r@far.example"], _mail("measured"))
        wait_until(lambda: "measured" in _tokens(sink), timeout=30)

        def labels() -> list[str]:
            body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
            return [line for line in body.splitlines() if line.startswith("trimail_destination_connections{")]

        # the worker ends once the connection cache time has passed with no job
        wait_until(lambda: not labels(), timeout=30)
        assert_serving(d)


def test_a_metrics_slowloris_under_a_low_descriptor_limit_leaves_the_control_socket_working(daemon):
    """With 100 descriptors (``prlimit`` on the master), 150 connections trickling to
    the metrics endpoint held them all (256 slots): ``trimail status`` said "not
    running" for as long as they stayed.  Now an endpoint serves at most an eighth
    of the descriptors at once (net.reading.slots), evicting the oldest trickler
    for a newcomer."""
    d = daemon(smtpd_workers=1, metrics_listen="127.0.0.1:0")
    line = d.proc.wait_log(r"metrics endpoint listening on")
    metrics_port = int(re.search(r"listening on .*?:(\d+)", line).group(1))
    resource.prlimit(d.proc.proc.pid, resource.RLIMIT_NOFILE, (100, 100))
    tricklers: list[socket.socket] = []
    try:
        for _ in range(150):
            sock = socket.create_connection(("127.0.0.1", metrics_port), timeout=10)
            sock.sendall(b"GET /metrics HTTP/1.0\r\n")  # and never the end of the request
            tricklers.append(sock)
        assert serve_status(d.queue_directory)["pid"] == d.proc.proc.pid
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=20).read().decode()
        assert "trimail_queue_messages" in body
    finally:
        for sock in tricklers:
            sock.close()
    assert_serving(d)


@pytest.mark.parametrize("workers", [1, 0])
def test_a_removed_control_socket_is_bound_again(daemon, workers):
    """The control socket removed while serve runs (a clean-up of the queue
    directory): ``trimail status``, ``stop`` and ``reload`` said "not running", and
    ``sendmail``'s wake-up was lost, so its mail waited for ``queue_run_delay``.  Now
    serve binds it again within ``KEEP_EVERY`` (5 s) and says so."""
    d = daemon(smtpd_workers=workers)
    (d.queue_directory / "control").unlink()
    d.proc.wait_log(r"warning: control socket .*control was removed or replaced: bound again", timeout=20)
    assert serve_status(d.queue_directory)["pid"] == d.proc.proc.pid
    assert_serving(d)


def test_a_directory_in_place_of_the_control_socket_ends_nothing(daemon):
    """What takes the control socket's place may not be removable (a directory): serve
    says so once and goes on; once it is gone, the socket is bound again."""
    d = daemon(smtpd_workers=1)
    path = d.queue_directory / "control"
    path.unlink()
    path.mkdir()
    (path / "keep").write_text("x")
    d.proc.wait_log(r"warning: the control socket was removed or replaced, and cannot be bound again", timeout=20)
    assert _still_running(d)
    assert_serving(d)
    (path / "keep").unlink()
    path.rmdir()
    d.proc.wait_log(r"control socket .*control was removed or replaced: bound again", timeout=20)
    assert serve_status(d.queue_directory)["pid"] == d.proc.proc.pid
