"""An AUTH flood from many addresses does not starve the sessions receiving mail.

Each failed AUTH costs a 16 MiB scrypt.  On trio's shared thread pool a flood of
bad passwords from many client addresses (the per-client failure limit does not
help) queued ahead of every spool write and free-space check, and a client
sending a big message waited for the whole flood.  AUTH checks have their own two
threads now; the flood waits for those, and mail goes on (the test counts serve's
threads during a flood from 40 addresses: 43 before, a handful now).
"""

from __future__ import annotations

import base64
import smtplib
import ssl
import subprocess
import sys
import threading

from tests.faults.conftest import assert_serving, process_tree, send
from tests.faults.test_connections import listening_ports


def _bad_logins(port: int, source: str, attempts: int, done: list[int]) -> None:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with smtplib.SMTP_SSL("127.0.0.1", port, timeout=120, context=context,
                              source_address=(source, 0)) as client:
            client.ehlo("flood.example")
            for n in range(attempts):
                token = base64.b64encode(f"\0user{n}\0wrong".encode()).decode()
                client.docmd("AUTH", f"PLAIN {token}")
                done.append(1)
    except (OSError, smtplib.SMTPException):
        pass


def _threads(pid: int) -> int:
    """Threads of serve and all its processes (its smtpd workers run the sessions)."""
    total = 0
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/status") as status:
                total += next(int(line.split()[1]) for line in status if line.startswith("Threads:"))
        except OSError:  # gone meanwhile
            continue
    return total


def test_an_auth_flood_gets_two_threads_and_mail_goes_on(daemon, cert, tmp_path):
    served = daemon(master_service_disable="qmgr", smtpd_tls_cert_file=cert, smtps_listen="127.0.0.1:0",
                    smtpd_sasl_password_file=tmp_path / "sasl_passwd", smtpd_auth_failure_limit="100",
                    message_size_limit="0")
    added = subprocess.run([sys.executable, "-m", "trimail", "passwd", "add", "alice", "-c", str(served.config_path)],
                           input=b"correct horse\n", capture_output=True, timeout=60)
    assert added.returncode == 0, added.stderr
    pid = served.proc.proc.pid
    smtps = listening_ports(served)[-1]
    before = _threads(pid)
    attempts, flooders = 3, 40
    done: list[int] = []
    threads = [threading.Thread(target=_bad_logins, args=(smtps, f"127.0.1.{n + 1}", attempts, done))
               for n in range(flooders)]
    for thread in threads:
        thread.start()
    most = before
    try:
        big = b"Subject: big\r\n\r\n" + (b"z" * 76 + b"\r\n") * (1_500_000 // 78)  # spooled through threads
        send(served.port, ["bob@example.com"], big)
        while any(thread.is_alive() for thread in threads):
            most = max(most, _threads(pid))
            threads[0].join(0.01)  # sampling pace
    finally:
        for thread in threads:
            thread.join(300)
    assert len(done) >= flooders * attempts * 0.9, "the flood did not happen"
    # two scrypt threads at most, plus the few that spool and look things up
    assert most - before <= 8, (before, most)
    assert_serving(served)
