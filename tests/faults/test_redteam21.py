"""Red team 21: today's changes under attack (the TLS context cache, the endpoints'
slow-request eviction, lazy metrics, the test queue's inline writer).

Each test runs a real ``trimail serve`` and checks that nothing outside one session
ends or freezes it (STYLE.md section 0).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_main_cf
from tests.faults.conftest import banner, trimail_cmd

HOST = "127.0.61.1"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> Path:
    import trustme

    path = tmp_path_factory.mktemp("cert") / "good.pem"
    trustme.CA().issue_cert("mx.test.example").private_key_and_cert_chain_pem.write_to_path(str(path))
    return path


def test_a_certificate_replaced_by_a_fifo_does_not_freeze_serve_at_reload(daemon, tmp_path, certificate):
    """The TLS context cache reads the certificate file to know its content.  A FIFO
    in its place blocked that open() until a writer came: a reload of a single-process
    serve froze the event loop for good (no 220, no status, SIGTERM ignored).  Now
    anything but a regular file cannot be read: the reload keeps the certificate
    loaded at start and serve goes on."""
    cert = tmp_path / "cert.pem"
    cert.write_bytes(certificate.read_bytes())
    d = daemon(smtpd_listen=f"{HOST}:0", smtpd_workers=0, master_service_disable="qmgr", smtpd_tls_cert_file=cert)
    cert.unlink()
    os.mkfifo(cert)
    result = trimail_cmd("reload", "-c", str(d.config_path), timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    d.proc.wait_log(r"cannot read .*cert\.pem.*keeping the certificate loaded at start")
    assert banner(d.port, HOST).startswith("220 ")
    assert trimail_cmd("status", "-c", str(d.config_path), timeout=30).returncode == 0
    assert d.proc.stop(timeout=30) == 0


def test_a_fifo_as_certificate_is_one_fatal_line_at_start(tmp_path):
    fifo = tmp_path / "cert.pem"
    os.mkfifo(fifo)
    config_path = write_main_cf(tmp_path, smtpd_listen=f"{HOST}:0", smtpd_workers=0, smtpd_tls_cert_file=fifo)
    result = subprocess.run([sys.executable, "-m", "trimail", "serve", "-c", str(config_path)],
                            check=False, capture_output=True, text=True, timeout=20)
    assert result.returncode == 2, result.stderr
    fatal = [line for line in result.stderr.splitlines() if "fatal" in line]
    assert len(fatal) == 1 and "not a regular file" in fatal[0] and "Traceback" not in result.stderr
