"""Per-client limits hold for the whole service, not per smtpd worker: with two
workers a client that holds ``smtpd_client_connection_count_limit`` sessions spread
over both is refused everywhere, ``smtpd_client_connection_rate_limit`` counts its
connections to every worker, and ``smtpd_auth_failure_limit`` its failed AUTH
attempts in every worker (Postfix's one anvil(8) for all smtpd processes;
trimail.processes.clients)."""

from __future__ import annotations

import base64
import socket
import subprocess
import sys

from tests.faults.conftest import banner, smtp_command, wait_until
from tests.faults.test_redteam16 import HOST, _sessions_by_worker


def _greeting(port: int) -> bytes:
    return banner(port, HOST).encode()


def test_the_connection_count_limit_counts_the_sessions_of_every_worker(daemon):
    d = daemon(smtpd_workers=2, master_service_disable="qmgr", smtpd_listen=f"{HOST}:0",
               smtpd_client_connection_count_limit=2, smtpd_timeout="300s")
    held, _ = _one_in_each_worker(d)  # the client's limit of 2, one session in each worker
    try:
        for _ in range(6):  # whichever worker takes it: refused
            assert _greeting(d.port).startswith(b"421 4.7.0"), "a third session from one client"
    finally:
        for conn in held:
            conn.close()
    assert_serving_on(d)


OTHER_CLIENTS = "127.0.23.{}"  # filler sessions, each from an address of its own (99, 98, ...): they count
# for no limit of the client, nor for one of their own (two fillers from one address met its count limit)


def _one_in_each_worker(d) -> tuple[list[socket.socket], int]:
    """Sessions of the client opened one at a time until each of the two workers
    holds one, and how many connections of the client that took.  A second one in
    the same worker is closed again and a session from another address is put in
    that worker, so that the next connection is the other worker's turn (the
    session board gives it to the least busy; net.listener.DeferredAccept)."""
    held: dict[int, socket.socket] = {}
    fillers: list[socket.socket] = []

    def opened(source: str | None = None) -> tuple[socket.socket, int]:
        before = _sessions_by_worker(d)
        conn = socket.create_connection((HOST, d.port), timeout=10,
                                        source_address=(source, 0) if source else None)
        assert conn.recv(4096).startswith(b"220")
        grown: list[int] = []

        def one_grew() -> bool:
            after = _sessions_by_worker(d)
            grown[:] = [pid for pid in after if after[pid] > before.get(pid, 0)]
            return len(grown) == 1

        wait_until(one_grew, timeout=10)
        return conn, grown[0]

    try:
        for made in range(1, 13):
            conn, worker = opened()
            if worker in held:
                before = {pid: count - (pid == worker) for pid, count in _sessions_by_worker(d).items()}
                conn.close()
                wait_until(lambda before=before: _sessions_by_worker(d) == before, timeout=10)
                fillers.append(opened(OTHER_CLIENTS.format(99 - len(fillers)))[0])
                continue
            held[worker] = conn
            if len(held) == 2:
                return list(held.values()), made
    finally:
        for filler in fillers:
            filler.close()
    for conn in held.values():
        conn.close()
    raise AssertionError("the sessions of one client never reached both workers")


def test_the_connection_rate_limit_counts_connections_to_every_worker(daemon):
    limit = 16
    d = daemon(smtpd_workers=2, master_service_disable="qmgr", smtpd_listen=f"{HOST}:0",
               smtpd_client_connection_rate_limit=limit, smtpd_timeout="300s")
    held, made = _one_in_each_worker(d)  # connections to both workers: *made* of 16 this minute
    try:
        answers = [_greeting(d.port)[:9] for _ in range(limit - made + 4)]
    finally:
        for conn in held:
            conn.close()
    assert answers[:limit - made] == [b"220 mx.te"] * (limit - made), answers
    assert answers[limit - made:] == [b"421 4.7.0"] * 4, answers


def assert_serving_on(d) -> None:
    """Serve answers again once the client's sessions are gone."""
    wait_until(lambda: sum(_sessions_by_worker(d).values()) == 0, timeout=10)
    assert _greeting(d.port).startswith(b"220 ")
    assert d.alive


def test_failed_auth_attempts_count_in_every_worker(daemon, tmp_path):
    d = daemon(smtpd_workers=2, master_service_disable="qmgr", smtpd_listen=f"{HOST}:0", smtpd_timeout="300s",
               smtpd_sasl_auth_enable="yes", smtpd_tls_auth_only="no", smtpd_auth_failure_limit=2,
               smtpd_sasl_password_file=tmp_path / "sasl_passwd")
    added = subprocess.run([sys.executable, "-m", "trimail", "passwd", "add", "alice", "-c", str(d.config_path)],
                           check=False, input=b"correct horse\n", capture_output=True, timeout=60)
    assert added.returncode == 0, added.stderr
    wrong = b"AUTH PLAIN " + base64.b64encode(b"\0alice\0wrong")
    held, _ = _one_in_each_worker(d)
    try:
        for conn in held:  # one failure in each worker: the client's limit of 2
            assert smtp_command(conn, b"EHLO client.example").startswith(b"250 ")
            assert smtp_command(conn, wrong).startswith(b"535 5.7.8")
    finally:
        for conn in held:
            conn.close()
    for _ in range(3):  # whichever worker it reaches: no more tries, even with the right password
        with socket.create_connection((HOST, d.port), timeout=10) as conn:
            assert conn.recv(4096).startswith(b"220")
            assert smtp_command(conn, b"EHLO client.example").startswith(b"250 ")
            right = b"AUTH PLAIN " + base64.b64encode(b"\0alice\0correct horse")
            assert smtp_command(conn, right).startswith(b"454 4.7.0"), "a third AUTH attempt was tried"
