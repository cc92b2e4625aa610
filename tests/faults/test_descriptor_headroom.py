"""Descriptors kept free in a process that accepts SMTP connections: idle clients
may take every session slot the descriptor limit allows, but not the descriptors
the control socket, the metrics endpoint and the sessions in progress need.

Found by red team 29b and left then: with ``smtpd_workers = 0`` (one process) and
a low ``RLIMIT_NOFILE``, idle connections held every descriptor, and ``trimail
status`` said "not running" (the control socket's accept failed with EMFILE too)
until stress cut them.
"""

from __future__ import annotations

import json
import resource
import socket

from tests.faults.conftest import assert_serving, banner
from trimail.net.control import send_command

LIMIT = 96


def test_idle_connections_leave_the_control_socket_its_descriptors(daemon):
    """One process (with workers the control socket is the master's, whose
    descriptors no client takes)."""
    d = daemon(smtpd_workers=0, smtpd_client_connection_count_limit=0,
               smtpd_client_connection_rate_limit=0, smtpd_timeout="${stress?{3}:{300}}s")  # stress: cut after 3 s
    resource.prlimit(d.proc.proc.pid, resource.RLIMIT_NOFILE, (LIMIT, LIMIT))
    idle: list[socket.socket] = []
    try:
        for _ in range(150):
            idle.append(socket.create_connection(("127.0.0.1", d.port), timeout=10))
        # every slot the limit allows is taken (the rest wait in the backlog) ...
        d.proc.wait_log(r"out of file descriptors at \d+ sessions of this process")
        # ... and serve still answers its operator at once (not after stress cut them)
        answer = send_command(d.queue_directory, "status", timeout=3)
        assert answer is not None and json.loads(answer)["stress"] is True
        assert banner(d.port, timeout=40).startswith("220 ")  # stress cut the idle sessions
    finally:
        for sock in idle:
            sock.close()
    assert_serving(d)
