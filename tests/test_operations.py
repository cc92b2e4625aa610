"""Operating a running serve: reload under load, graceful stop, status, and a mail log pflogsumm reads."""

from __future__ import annotations

import json
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import trimail, write_main_cf
from tests.peers import Sink
from tests.ports import free_port


class Sender(threading.Thread):
    """Keeps sending over one connection until told to stop; records every 250."""

    def __init__(self, port: int, name: str) -> None:
        super().__init__(daemon=True)
        self.port, self.label = port, name
        self.queued: list[str] = []
        self.errors: list[str] = []
        self.halt = threading.Event()
        self.banner = b""

    def run(self) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as client:
                while not self.halt.is_set():
                    client.mail("a@client.example")
                    client.rcpt(f"{self.label}@far.example")
                    code, reply = client.data(b"Subject: load\r\n\r\nx\r\n")
                    if code != 250:
                        self.errors.append(f"{code} {reply!r}")
                        return
                    self.queued.append(reply.decode().rsplit(" ", 1)[1])
        except (smtplib.SMTPException, OSError) as exc:
            self.errors.append(repr(exc))


def banner(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        greeting = sock.recv(1024)
        sock.sendall(b"QUIT\r\n")
        return greeting


def queued_ids(config_path: Path) -> set[str]:
    result = trimail("queue", "list", "--json", "-c", str(config_path))
    return {m["id"] for m in json.loads(result.stdout)}


def test_reload_under_load_keeps_sessions_and_applies_new_settings(tmp_path, serve_process):
    config_path = write_main_cf(tmp_path, smtpd_banner="$myhostname ESMTP version0")
    proc = serve_process(config_path)
    senders = [Sender(proc.port, f"s{i}") for i in range(3)]
    for sender in senders:
        sender.start()
    for version in range(1, 6):
        text = config_path.read_text()
        config_path.write_text(re.sub(r"version\d+", f"version{version}", text))
        result = trimail("reload", "-c", str(config_path))
        assert result.returncode == 0, result.stderr
        assert banner(proc.port).startswith(f"220 mx.test.example ESMTP version{version}".encode())
    broken = config_path.read_text()
    config_path.write_text(broken + "smtpd_timeout = whenever\n")
    refused = trimail("reload", "-c", str(config_path).replace("main.cf", "main.cf"))
    config_path.write_text(broken)
    assert refused.returncode in (1, 2) and "smtpd_timeout" in refused.stderr
    assert banner(proc.port).startswith(b"220 mx.test.example ESMTP version5")  # still serving, old config
    for sender in senders:
        sender.halt.set()
    for sender in senders:
        sender.join(30)
    assert all(not s.errors for s in senders), [s.errors for s in senders]
    accepted = {i for s in senders for i in s.queued}
    assert len(accepted) > 10
    assert accepted <= queued_ids(config_path)  # nothing that got 250 is lost
    assert proc.stop() == 0


def test_reload_with_a_broken_configuration_is_refused_by_serve_itself(tmp_path, serve_process):
    config_path = write_main_cf(tmp_path)
    proc = serve_process(config_path)
    good = config_path.read_text()
    config_path.write_text(good + "smtpd_recipient_restrictions = reject_everything_evil\n")
    proc.proc.send_signal(signal.SIGHUP)  # SIGHUP means reload, as for Postfix
    proc.wait_log("reload refused, keeping the running configuration")
    config_path.write_text(good)
    assert banner(proc.port).startswith(b"220 ")
    assert trimail("status", "-c", str(config_path)).returncode == 0
    assert proc.stop() == 0


def test_stop_under_load_loses_no_accepted_message_and_status_follows(tmp_path, serve_process):
    config_path = write_main_cf(tmp_path)
    proc = serve_process(config_path)
    status = trimail("status", "-c", str(config_path))
    assert status.returncode == 0 and f"pid {proc.proc.pid}" in status.stdout and "incoming" in status.stdout
    senders = [Sender(proc.port, f"s{i}") for i in range(4)]
    for sender in senders:
        sender.start()
    deadline = time.monotonic() + 30
    while sum(len(s.queued) for s in senders) < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    stopped = trimail("stop", "-c", str(config_path))
    assert stopped.returncode == 0, stopped.stderr
    for sender in senders:
        sender.join(30)
    assert proc.proc.wait(30) == 0
    accepted = {i for s in senders for i in s.queued}
    assert accepted and accepted <= queued_ids(config_path)
    assert trimail("status", "-c", str(config_path)).returncode == 1


@pytest.fixture
def pflogsumm():
    path = shutil.which("pflogsumm")
    if path is None:
        subprocess.run(["apt-get", "install", "-y", "-qq", "pflogsumm"], capture_output=True, timeout=300)
        path = shutil.which("pflogsumm")
    if path is None:
        pytest.skip("pflogsumm is not installed and could not be installed")
    return path


def test_pflogsumm_reads_the_mail_log_with_exact_counts(tmp_path, pflogsumm):
    # the dead port stays bound (never listening: connections are refused) for the whole
    # test, so serve's own listener on 127.0.0.1:0 cannot be given it: it once was, and
    # the mail for dead.example "looped back to myself" and bounced instead of deferring
    with socket.socket() as probe, Sink(rules={"bad": "550 5.1.1 no such user"}) as sink:
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
        maillog = tmp_path / "maillog"
        config_path = write_main_cf(
            tmp_path, master_service_disable="", maillog_file=str(maillog), mynetworks="127.0.0.1/32",
            smtp_connect_timeout="2s",
            transport_maps=f"inline:{{ good.example=smtp:[127.0.0.1]:{sink.port}, "
                           f"client.example=smtp:[127.0.0.1]:{sink.port}, dead.example=smtp:[127.0.0.1]:{dead} }}")
        proc = subprocess.Popen([sys.executable, "-m", "trimail", "serve", "-c", str(config_path)])
        try:
            deadline = time.monotonic() + 30
            while not (maillog.exists() and "daemon started" in maillog.read_text()):
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
            port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", maillog.read_text()).group(1))
            for rcpt in ["ok1@good.example", "ok2@good.example", "bad@good.example", "x@dead.example"]:
                with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                    client.sendmail("a@client.example", [rcpt], "Subject: t\r\n\r\nx\r\n")
            with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=("127.0.0.2", 0)) as client:
                client.ehlo("outside.example")
                client.mail("a@client.example")
                assert client.rcpt("r@far.example")[0] == 450
            deadline = time.monotonic() + 30
            while maillog.read_text().count("removed") < 4 or "status=deferred" not in maillog.read_text():
                assert time.monotonic() < deadline, maillog.read_text()
                time.sleep(0.05)
        finally:
            proc.terminate()
            proc.wait(30)
    report = subprocess.run([pflogsumm, "--syslog-name=trimail", str(maillog)], capture_output=True, text=True,
                            timeout=60).stdout
    totals = {name: int(count) for count, name in re.findall(r"^\s+(\d+)\s+(received|delivered|deferred|bounced|"
                                                             r"rejected)\b", report, re.M)}
    # 4 accepted over SMTP (the refused transaction never got a queue ID, so no client=
    # line: not received, as with Postfix; nor is the bounce notification, which Postfix's
    # bounce daemon makes without smtpd or pickup); ok1, ok2 and the notification delivered
    # ("removed" 4 times: ok1, ok2, the bounced message, the notification)
    assert totals == {"received": 4, "delivered": 3, "deferred": 1, "bounced": 1, "rejected": 1}, report[:800]


async def test_metrics_endpoint_counts_move(start_mta):
    import urllib.request

    import trio

    from tests.delivery.test_delivery import send, wait_empty

    with Sink(rules={"bad": "550 5.1.1 no such user"}) as sink:
        srv = await start_mta(metrics_listen="127.0.0.1:0", mynetworks="127.0.0.1/32",
                              transport_maps=f"inline:{{ far.example=smtp:[127.0.0.1]:{sink.port}, "
                                             f"client.example=smtp:[127.0.0.1]:{sink.port} }}")
        url = f"http://127.0.0.1:{srv.metrics_addresses[0].port}/metrics"

        def scrape() -> dict[str, float]:
            text = urllib.request.urlopen(url, timeout=30).read().decode()
            return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                    if line and not line.startswith("#")}

        before = await trio.to_thread.run_sync(scrape)
        assert before["trimail_messages_received_total"] == 0
        await send(srv, "a@client.example", ["ok@far.example", "bad@far.example"])
        await wait_empty(srv)

        def refused() -> int:
            with smtplib.SMTP("127.0.0.1", srv.addresses[0].port, timeout=30,
                              source_address=("127.0.0.2", 0)) as client:
                client.ehlo("x.example")
                client.mail("a@client.example")
                return client.rcpt("r@elsewhere.example")[0]

        assert await trio.to_thread.run_sync(refused) == 450
        after = await trio.to_thread.run_sync(scrape)
        assert after["trimail_messages_received_total"] == 1  # accepted over SMTP (the bounce is ours)
        assert after['trimail_recipients_delivered_total{transport="smtp"}'] == 2
        assert after['trimail_recipients_bounced_total{dsn_class="5.x.x"}'] == 1
        assert after['trimail_smtpd_rejects_total{code="450",command="RCPT"}'] == 1
        assert after['trimail_queue_messages{state="incoming"}'] == 0
        assert after["trimail_queue_commit_batch_size_count"] > 0
        assert after["trimail_delivery_duration_seconds_count"] == 2


def test_serve_notifies_systemd_when_ready(tmp_path):
    notify = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.settimeout(30)
    import os

    env = dict(os.environ, NOTIFY_SOCKET=str(notify))
    proc = subprocess.Popen([sys.executable, "-m", "trimail", "serve", "-c", str(write_main_cf(tmp_path))],
                            env=env, stderr=subprocess.DEVNULL)
    try:
        assert sock.recv(64) == b"READY=1"
        proc.send_signal(signal.SIGTERM)
        assert sock.recv(64) == b"STOPPING=1"
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        sock.close()


def test_reload_opens_new_listeners_and_closes_removed_ones(tmp_path, serve_process):
    second = free_port()
    config_path = write_main_cf(tmp_path)
    proc = serve_process(config_path)
    first = proc.port
    text = config_path.read_text()
    config_path.write_text(text.replace("smtpd_listen = 127.0.0.1:0", f"smtpd_listen = 127.0.0.1:{second}"))
    assert trimail("reload", "-c", str(config_path)).returncode == 0
    assert banner(second).startswith(b"220 ")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", first), timeout=5).close()
    assert proc.stop() == 0


def test_a_node_is_drained_by_emptying_smtpd_listen_and_reloading(tmp_path, serve_process):
    """docs/architecture.md, "Draining a node": no listener, serve still running."""
    config_path = write_main_cf(tmp_path)
    proc = serve_process(config_path)
    assert banner(proc.port).startswith(b"220 ")
    config_path.write_text(config_path.read_text().replace("smtpd_listen = 127.0.0.1:0", "smtpd_listen ="))
    assert trimail("reload", "-c", str(config_path)).returncode == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", proc.port), timeout=5).close()
    status = trimail("status", "-c", str(config_path))
    assert status.returncode == 0 and "not listening (drained)" in status.stdout
    assert proc.stop() == 0


def test_reload_picks_up_a_renewed_tls_certificate(tmp_path, serve_process):
    """A certificate renewed in place (a new key from another CA) is served to new
    STARTTLS sessions after `trimail reload`, without a restart."""
    import ssl

    import trustme

    old_ca, new_ca = trustme.CA(), trustme.CA()
    cert = tmp_path / "cert.pem"
    old_ca.issue_cert("mx.test.example", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(cert))
    config_path = write_main_cf(tmp_path, smtpd_tls_cert_file=str(cert))
    proc = serve_process(config_path)

    def trusted_by(ca: trustme.CA) -> bool:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        with smtplib.SMTP("127.0.0.1", proc.port, timeout=30) as client:
            client.ehlo("client.example")
            try:
                client.starttls(context=context)
            except ssl.SSLCertVerificationError:
                return False
            return client.ehlo("client.example")[0] == 250

    assert trusted_by(old_ca) and not trusted_by(new_ca)
    new_ca.issue_cert("mx.test.example", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(cert))
    assert trusted_by(old_ca)  # nothing changes before the reload
    assert trimail("reload", "-c", str(config_path)).returncode == 0
    assert trusted_by(new_ca) and not trusted_by(old_ca)
    assert proc.stop() == 0


def test_check_reports_errors_with_a_non_zero_exit(tmp_path):
    import trustme

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        cert = tmp_path / "cert.pem"
        trustme.CA().issue_cert("mx.test.example").private_key_and_cert_chain_pem.write_to_path(str(cert))
        config_path = write_main_cf(tmp_path, smtpd_listen=f"127.0.0.1:{port}", smtpd_tls_cert_file=str(cert))
        result = trimail("check", "-c", str(config_path))
        assert result.returncode == 1
        assert f"error: smtpd_listen: cannot listen on 127.0.0.1:{port}" in result.stderr
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    result = trimail("check", "-c", str(config_path))
    assert result.returncode == 1 and "error: smtpd_tls_cert_file" in result.stderr


def test_check_warns_when_the_dns_resolver_does_not_answer(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))  # receives queries, never answers
        config_path = write_main_cf(tmp_path, dns_nameservers=f"127.0.0.1:{silent.getsockname()[1]}")
        result = trimail("check", "-c", str(config_path))
    assert "DNS resolver (127.0.0.1:" in result.stderr and "does not answer" in result.stderr
