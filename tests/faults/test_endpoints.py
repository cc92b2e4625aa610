"""The operator's endpoints under abuse: the metrics port and the control socket.

A client that resets its connection in the middle of a request (or sends garbage,
or nothing) costs that one request: serve goes on answering ``220``, ``/metrics``
goes on answering ``200`` and ``trimail status`` goes on working.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import time
import urllib.request
from pathlib import Path

from tests.faults.conftest import Daemon, assert_serving, trimail_cmd

RESETS = 300


def metrics_port(d: Daemon) -> int:
    line = d.proc.wait_log(r"metrics endpoint listening on")
    return int(re.search(r"listening on .*?:(\d+)", line).group(1))


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the kernel sends RST instead of FIN (TCP)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def connect(d: Daemon, port: int) -> socket.socket:
    try:
        return socket.create_connection(("127.0.0.1", port), timeout=10)
    except ConnectionRefusedError:
        raise AssertionError("serve is gone:\n" + "\n".join(d.proc.log[-30:])) from None


def scrape(port: int) -> tuple[int, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        return response.status, response.read().decode()


def test_reset_metrics_requests_cost_one_request_each(daemon):
    d = daemon(metrics_listen="127.0.0.1:0")
    port = metrics_port(d)
    for number in range(RESETS):
        sock = connect(d, port)
        if number % 3 == 0:
            sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        elif number % 3 == 1:
            sock.sendall(b"GET /metrics HTTP/1.0\r\nHost: x\r\n")  # half a request
        reset(sock)
    # a reader that never reads its answer: the response fills its window, then RST
    for _ in range(20):
        sock = connect(d, port)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n" * 50)
        reset(sock)
    status, text = scrape(port)
    assert status == 200 and "trimail_messages_received_total" in text
    assert_serving(d)
    assert trimail_cmd("status", "-c", str(d.config_path)).returncode == 0


def test_reset_and_garbage_on_the_control_socket_cost_one_request_each(daemon):
    d = daemon()
    path = str(Path(d.queue_directory) / "control")
    for number in range(RESETS):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        kind = number % 5
        if kind == 0:
            sock.sendall(b"status\n")  # ask, then leave before the answer
        elif kind == 1:
            sock.sendall(b"sta")  # half a command
        elif kind == 2:
            sock.sendall(b"\xff\xfe\x00garbage" * 100)  # longer than a command line, no newline
        elif kind == 3:
            sock.sendall(b"ping\nping\nping\n" * 50)  # more than one line: unread data at close
        reset(sock)
    assert_serving(d)
    result = trimail_cmd("status", "-c", str(d.config_path))
    assert result.returncode == 0 and "running" in result.stdout, result.stdout + result.stderr
    assert not [line for line in d.proc.log if "Traceback" in line]


def control_clients(d: Daemon, count: int, saying: bytes = b"") -> list[socket.socket]:
    """*count* connections to serve's control socket, each having sent *saying* and
    nothing more (the caller closes them)."""
    path = str(Path(d.queue_directory) / "control")
    clients: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            clients.append(sock)
            sock.connect(path)
            if saying:
                sock.sendall(saying)
    except BaseException:
        for sock in clients:
            sock.close()
        raise
    return clients


def test_a_silent_control_client_does_not_block_the_next_one(daemon):
    d = daemon()
    silent = control_clients(d, 5)  # connected, never say anything
    try:
        result = trimail_cmd("status", "-c", str(d.config_path), timeout=4)
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        for sock in silent:
            sock.close()
    assert_serving(d)


def test_descriptor_exhaustion_delays_the_endpoints_but_does_not_end_them(daemon):
    import resource

    d = daemon(metrics_listen="127.0.0.1:0", master_service_disable="qmgr")
    port = metrics_port(d)
    assert scrape(port)[0] == 200  # the reading connection the scrape needs is open now
    pid = d.proc.proc.pid
    limits = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    try:  # not one descriptor left: every accept fails with EMFILE
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (len(os.listdir(f"/proc/{pid}/fd")), limits[1]))
        waiting_control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        waiting_control.settimeout(30)
        waiting_control.connect(str(Path(d.queue_directory) / "control"))
        waiting_control.sendall(b"ping\n")
        waiting_metrics = connect(d, port)
        waiting_metrics.settimeout(30)
        waiting_metrics.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        d.proc.wait_log(r"accept: .*Too many open files")
    finally:
        if d.alive:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)
    assert waiting_control.recv(64) == b"ok\n", "\n".join(d.proc.log[-20:])
    assert waiting_metrics.recv(64).startswith(b"HTTP/1.0 200")
    waiting_control.close()
    waiting_metrics.close()
    assert_serving(d)
    assert trimail_cmd("status", "-c", str(d.config_path)).returncode == 0


def test_slow_partial_requests_cannot_hold_every_metrics_slot(daemon):
    """Slowloris: more clients than the endpoint's slots (256) each send part of a
    request and stay within every read deadline.  A scrape behind them in the
    backlog must still be answered within a few seconds (a trickler older than
    EVICT_AFTER makes way for each newcomer), not after the tricklers' 10 s read
    deadline, nor after (its place in the backlog) / 32 s as with 32 slots."""
    d = daemon(metrics_listen="127.0.0.1:0", master_service_disable="qmgr")
    port = metrics_port(d)
    tricklers = []
    try:
        for _ in range(300):  # 256 take every slot, 44 wait in the backlog
            sock = connect(d, port)
            sock.sendall(b"GET /metrics HTTP/1.0\r\nX-Slow: ")
            tricklers.append(sock)
        began = time.monotonic()
        client = connect(d, port)
        client.settimeout(8)  # under the tricklers' 10 s read deadline
        client.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
        assert answer.startswith(b"HTTP/1.0 200"), answer[:200]
        assert b"trimail_smtpd_sessions" in answer
        assert time.monotonic() - began < 4, "the scrape waited for the tricklers"
        client.close()
    finally:
        for sock in tricklers:
            sock.close()
    assert_serving(d)


def test_a_request_cut_short_is_not_answered(daemon):
    """A partial request ended by end of file asks for nothing: no metrics page is
    made for it (a flood of them cost serve most of a core)."""
    d = daemon(metrics_listen="127.0.0.1:0", master_service_disable="qmgr")
    port = metrics_port(d)
    sock = connect(d, port)
    sock.sendall(b"GET ")
    sock.shutdown(socket.SHUT_WR)
    assert sock.recv(65536) == b""
    sock.close()
    assert scrape(port)[0] == 200


def test_slow_partial_commands_cannot_hold_every_control_slot(daemon):
    """The same on the control socket (256 slots, a 5 s read deadline)."""
    d = daemon()
    tricklers = control_clients(d, 300, b"sta")  # never finish the line
    try:
        began = time.monotonic()
        result = trimail_cmd("status", "-c", str(d.config_path), timeout=10)
        assert result.returncode == 0, result.stdout + result.stderr
        # not after the tricklers' 5 s read deadline (the CLI itself starts in about 0.5 s)
        assert time.monotonic() - began < 4, "status waited for the tricklers' deadline"
    finally:
        for sock in tricklers:
            sock.close()
    assert_serving(d)
