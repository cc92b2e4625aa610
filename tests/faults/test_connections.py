"""Connections that end badly: bursts of TCP resets at every point of a session.

A reset that arrives before serve has looked at the connection (accept, then
``getpeername()``), during the greeting pause, in the middle of a command or in
the middle of a TLS handshake costs that one connection and nothing else: serve
still answers ``220`` and takes a message afterwards.
"""

from __future__ import annotations

import os
import re
import resource
import socket
import struct
from concurrent.futures import ThreadPoolExecutor

from tests.faults.conftest import Daemon, assert_serving, integrity_ok, send, smtpd_pids, wait_until

BURST = 300


def listening_ports(d: Daemon) -> list[int]:
    """Every port serve listens on, in the order of its start line
    (smtpd_listen, submission_listen, smtps_listen)."""
    line = d.proc.wait_log(r"daemon started")
    return [int(port) for port in re.findall(r":(\d+)(?:,|$)", line.split("listening on", 1)[1])]


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the kernel sends RST instead of FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def rst_at_once(port: int) -> None:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    reset(sock)


def rst_after(port: int, data: bytes, read_banner: bool = False) -> None:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        if read_banner:
            sock.recv(4096)
        sock.sendall(data)
    except OSError:
        pass
    reset(sock)


# The first bytes of a TLS 1.2 ClientHello record, cut short.
HALF_CLIENT_HELLO = bytes.fromhex("160301020001000200") + b"\x03\x03" + bytes(20)


def burst(port: int, attack, *args) -> None:
    """BURST connections doing *attack*, sixteen at a time (a refused connection
    is not an error here: assert_serving afterwards says whether serve died)."""
    def one() -> None:
        try:
            attack(port, *args)
        except ConnectionRefusedError:
            pass

    with ThreadPoolExecutor(16) as pool:
        for future in [pool.submit(one) for _ in range(BURST)]:
            future.result()


def test_rst_bursts_cost_only_their_connections(daemon, cert) -> None:
    d = daemon(smtpd_tls_cert_file=cert, smtps_listen="127.0.0.1:0", smtpd_greet_pause="0.05s",
               master_service_disable="qmgr")
    smtp_port, smtps_port = listening_ports(d)
    burst(smtp_port, rst_at_once)
    burst(smtp_port, rst_after, b"MAIL FROM:<a@b.exa")  # during the greeting pause
    burst(smtp_port, rst_after, b"EHLO client.example\r\nMAIL FROM:<a@b", True)
    burst(smtps_port, rst_at_once)
    burst(smtps_port, rst_after, HALF_CLIENT_HELLO)
    assert_serving(d)
    queue_id = send(d.port, ["bob@relay.example"], sender="alice@client.example")
    assert re.fullmatch(r"[0-9A-Za-z]+", queue_id)
    wait_until(lambda: any(f"{queue_id}: client=" in line for line in d.proc.log))
    assert integrity_ok(d.queue_directory) == "ok"
    assert not [line for line in d.proc.log if "Traceback" in line or " failed: " in line]
    # the race of defect 2 was really run: some resets arrived before getpeername()
    assert any("lost connection after CONNECT from unknown" in line for line in d.proc.log)


def test_accept_survives_descriptor_exhaustion_and_resumes(daemon) -> None:
    """EMFILE at accept(): serve waits (one warning), and accepts again by itself
    once descriptors are free."""
    d = daemon(master_service_disable="qmgr")
    in_use = {}
    for pid in smtpd_pids(d):  # every process that accepts (each smtpd worker)
        in_use[pid] = len(os.listdir(f"/proc/{pid}/fd"))
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use[pid] + 5, in_use[pid] + 5))
    silent = [socket.create_connection(("127.0.0.1", d.port), timeout=10) for _ in range(20 * len(in_use))]
    try:
        d.proc.wait_log(r"accept: out of resources: Too many open files")
    finally:
        for sock in silent:
            reset(sock)
    for pid, count in in_use.items():
        wait_until(lambda pid=pid, count=count: len(os.listdir(f"/proc/{pid}/fd")) <= count + 1)
    assert_serving(d)
    send(d.port, ["bob@relay.example"])
    assert not [line for line in d.proc.log if "Traceback" in line]
