"""``trimail check`` reports the addresses serve would listen on and whether they are
free, without ever binding one: beside a live serve (or another MTA) it takes no port."""

from __future__ import annotations

import smtplib
import socket
import subprocess
import sys
import threading

import dns.message
import pytest

from tests.conftest import write_main_cf
from tests.dnsserver import answer
from tests.ports import free_port
from trimail.check import listening_sockets

# Runs `trimail check` with an audit hook (PEP 578) that prints every socket.bind the
# command makes: the proof that check never binds, with nothing in trimail replaced.
AUDITED_CHECK = """
import sys
binds = []
def hook(event, args):
    if event == "socket.bind":
        binds.append(repr(args[1]))
sys.addaudithook(hook)
from trimail.cli import main
try:
    main(sys.argv[1:])
finally:
    print("BINDS:", binds, file=sys.stderr)
"""


def audited_check(config_path) -> tuple[subprocess.CompletedProcess[str], str]:
    result = subprocess.run([sys.executable, "-c", AUDITED_CHECK, "check", "-c", str(config_path)],
                            capture_output=True, text=True, timeout=60, check=False)
    binds = next(line for line in result.stderr.splitlines() if line.startswith("BINDS:"))
    return result, binds


@pytest.fixture
def nameserver():
    """A real DNS server on 127.0.43.12 (a random UDP port) answering check's probe
    (the root's NS records) at once: check waits up to 3 s for a silent resolver."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.43.12", 0))
    sock.settimeout(0.1)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                data, peer = sock.recvfrom(4096)
            except TimeoutError:
                continue
            sock.sendto(answer({".": {"NS": ["a.root.example."]}}, dns.message.from_wire(data)).to_wire(), peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.43.12:{sock.getsockname()[1]}"
    finally:
        done.set()
        thread.join()
        sock.close()


def test_check_beside_a_live_serve_binds_nothing_and_names_what_is_taken(tmp_path, serve_process, nameserver):
    live_dir = tmp_path / "live"
    live_dir.mkdir()
    live_config = write_main_cf(live_dir, smtpd_listen="127.0.43.10:0")
    proc = serve_process(live_config)
    port = proc.port
    spare = free_port("127.0.43.11")

    # a second configuration (another queue) that wants the live serve's port
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other = write_main_cf(other_dir, smtpd_listen=f"127.0.43.10:{port}", submission_listen=f"127.0.43.11:{spare}",
                          dns_nameservers=nameserver)
    result, binds = audited_check(other)
    assert result.returncode == 1
    assert f"trimail: smtpd_listen: would listen on 127.0.43.10:{port}: in use" in result.stdout.splitlines()
    assert f"trimail: submission_listen: would listen on 127.0.43.11:{spare}: free" in result.stdout.splitlines()
    assert (f"trimail: error: smtpd_listen: cannot listen on 127.0.43.10:{port}: Address already in use"
            in result.stderr)
    assert str(port) not in binds and str(spare) not in binds, binds

    # the wildcard collides with the live serve's address too
    wildcard = write_main_cf(other_dir, smtpd_listen=f"0.0.0.0:{port}", dns_nameservers=nameserver)
    result, binds = audited_check(wildcard)
    assert result.returncode == 1 and f"cannot listen on 0.0.0.0:{port}" in result.stderr
    assert str(port) not in binds, binds

    # the live serve's own configuration: its listeners are reported as serve's
    result, binds = audited_check(live_config)
    assert f"smtpd_listen: listens on 127.0.43.10:0 (serve (pid {proc.proc.pid}))" in result.stdout, result.stdout
    assert "cannot listen" not in result.stderr and binds == "BINDS: []"

    with smtplib.SMTP("127.0.43.10", port, timeout=30) as client:  # serve undisturbed
        assert client.noop()[0] == 250
    assert proc.stop() == 0


def test_listening_sockets_are_read_from_proc_net(tmp_path):
    (tmp_path / "tcp").write_text(
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        "   0: 0A2B007F:0019 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n"
        "   1: 0100007F:0050 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 2 1\n")
    (tmp_path / "tcp6").write_text(
        "  sl  local_address                         remote_address                        st\n"
        "   0: 00000000000000000000000001000000:024B 00000000000000000000000000000000:0000 0A 0 0\n"
        "   1: 00000000000000000000000000000000:0019 00000000000000000000000000000000:0000 0A 0 0\n")
    found = {(family, str(ip), port) for family, ip, port in listening_sockets(tmp_path)}
    assert found == {(socket.AF_INET, "127.0.43.10", 25), (socket.AF_INET6, "::1", 587),
                     (socket.AF_INET6, "::", 25)}  # the established connection (01) is no listener
    assert listening_sockets(tmp_path / "missing") is None
