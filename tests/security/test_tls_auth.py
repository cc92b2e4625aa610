"""STARTTLS (and its injection attack), submission with AUTH, and implicit TLS, over real sockets."""

from __future__ import annotations

import base64
import socket
import ssl

import trio

from tests.conftest import trimail
from trimail.queue.store import Store


def client_context(ca) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


class Line:
    """A tiny blocking SMTP client over a socket that can be upgraded to TLS."""

    def __init__(self, port: int, tls: ssl.SSLContext | None = None) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock = tls.wrap_socket(sock, server_hostname="mx.test.example") if tls else sock
        self.buf = b""

    def reply(self) -> tuple[int, list[str]]:
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(4096)
                if not chunk:
                    raise ConnectionError("closed: " + repr(lines))
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line.decode())
            if line[3:4] == b" ":
                return int(line[:3]), lines

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, line: str) -> tuple[int, list[str]]:
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def starttls(self, ctx: ssl.SSLContext) -> None:
        self.sock = ctx.wrap_socket(self.sock, server_hostname="mx.test.example")
        self.buf = b""


async def run(fn, *args):
    return await trio.to_thread.run_sync(fn, *args)


async def test_starttls_offered_once_and_used_in_received_header(start_mta, cert, ca):
    srv = await start_mta(smtpd_tls_cert_file=str(cert), master_service_disable="qmgr")

    def talk() -> tuple:
        c = Line(srv.addresses[0].port)
        c.reply()
        before = c.cmd("EHLO client.example")[1]
        assert c.cmd("STARTTLS") == (220, ["220 2.0.0 Ready to start TLS"])
        c.starttls(client_context(ca))
        after = c.cmd("EHLO client.example")[1]
        again = c.cmd("STARTTLS")
        c.cmd("MAIL FROM:<a@client.example>")
        c.cmd("RCPT TO:<b@far.example>")
        c.cmd("DATA")
        queued = c.cmd("Subject: tls\r\n\r\nx\r\n.")
        return before, after, again, queued, c.sock.version()

    before, after, again, queued, version = await run(talk)
    assert "250 STARTTLS" in before and not any("STARTTLS" in line for line in after)
    assert again == (554, ["554 5.5.1 Error: TLS already active"])
    queue_id = queued[1][0].rsplit(" ", 1)[1]
    content = Store.open(srv.config.queue_directory, readonly=True).read_content(queue_id)
    assert f"(using {version} with cipher ".encode() in content and b"with ESMTPS id" in content


async def test_commands_pipelined_with_starttls_are_never_executed(start_mta, cert, ca):
    """CVE-2011-0411 class: plaintext injected after STARTTLS must not run as if encrypted."""
    srv = await start_mta(smtpd_tls_cert_file=str(cert), master_service_disable="qmgr")

    def talk() -> tuple:
        c = Line(srv.addresses[0].port)
        c.reply()
        c.cmd("EHLO client.example")
        c.send(b"STARTTLS\r\nMAIL FROM:<evil@attacker.example>\r\nRCPT TO:<victim@far.example>\r\n")
        ready = c.reply()
        c.starttls(client_context(ca))
        ehlo = c.cmd("EHLO client.example")[0]
        rcpt = c.cmd("RCPT TO:<victim@far.example>")
        return ready, ehlo, rcpt

    ready, ehlo, rcpt = await run(talk)
    assert ready == (220, ["220 2.0.0 Ready to start TLS"])
    assert ehlo == 250
    assert rcpt == (503, ["503 5.5.1 Error: need MAIL command"])  # the injected MAIL never ran


async def test_encrypt_level_refuses_mail_before_starttls(start_mta, cert):
    srv = await start_mta(smtpd_tls_cert_file=str(cert), smtpd_tls_security_level="encrypt",
                          master_service_disable="qmgr")

    def talk():
        c = Line(srv.addresses[0].port)
        c.reply()
        c.cmd("EHLO client.example")
        return c.cmd("MAIL FROM:<a@client.example>")

    assert await run(talk) == (530, ["530 5.7.0 Must issue a STARTTLS command first"])


def auth_plain(user: str, password: str) -> str:
    return "AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()).decode()


async def test_submission_requires_tls_before_auth_and_logins_may_relay(submission, ca):
    srv = await submission()
    port = srv.addresses_by_kind["submission"][0].port

    def talk():
        c = Line(port)
        c.reply()
        plain_ehlo = c.cmd("EHLO client.example")[1]
        before_tls = c.cmd(auth_plain("alice", "correct horse"))
        c.cmd("STARTTLS")
        c.starttls(client_context(ca))
        tls_ehlo = c.cmd("EHLO client.example")[1]
        refused = (c.cmd("MAIL FROM:<alice@client.example>"), c.cmd("RCPT TO:<bob@far.example>"))
        c.cmd("RSET")
        good = c.cmd(auth_plain("alice", "correct horse"))
        c.cmd("MAIL FROM:<alice@client.example>")
        relayed = c.cmd("RCPT TO:<bob@far.example>")
        return plain_ehlo, before_tls, tls_ehlo, refused, good, relayed

    plain_ehlo, before_tls, tls_ehlo, refused, good, relayed = await run(talk)
    assert not any("AUTH" in line for line in plain_ehlo)
    assert before_tls[0] == 530  # submission: STARTTLS first
    assert any(line[4:] == "AUTH PLAIN LOGIN" for line in tls_ehlo)
    assert refused[1][0] == 554
    assert good == (235, ["235 2.7.0 Authentication successful"])
    assert relayed[0] == 250


async def test_auth_without_tls_is_refused_on_port_25(start_mta, cert):
    srv = await start_mta(smtpd_tls_cert_file=str(cert), smtpd_sasl_auth_enable="yes",
                          master_service_disable="qmgr")

    def talk():
        c = Line(srv.addresses[0].port)
        c.reply()
        ehlo = c.cmd("EHLO client.example")[1]
        return ehlo, c.cmd(auth_plain("alice", "x"))

    ehlo, reply = await run(talk)
    assert not any("AUTH" in line for line in ehlo)
    assert reply == (538, ["538 5.7.11 Encryption required for requested authentication mechanism"])


async def test_wrong_passwords_are_rate_limited(submission, ca):
    srv = await submission(smtpd_auth_failure_limit="3")
    port = srv.addresses_by_kind["smtps"][0].port

    def talk():
        c = Line(port, client_context(ca))  # smtps: implicit TLS
        c.reply()
        c.cmd("EHLO client.example")
        answers = [c.cmd(auth_plain("alice", f"guess{i}"))[0] for i in range(4)]
        answers.append(c.cmd(auth_plain("alice", "correct horse"))[0])  # locked out even when right
        return answers

    assert await run(talk) == [535, 535, 535, 454, 454]


async def test_auth_login_mechanism_and_sender_login_mismatch(submission, ca):
    srv = await submission(smtpd_sender_login_maps="inline:{ alice@client.example=alice, "
                                                   "boss@client.example=boss }",
                           smtpd_sender_restrictions="reject_sender_login_mismatch")
    port = srv.addresses_by_kind["smtps"][0].port

    def talk():
        c = Line(port, client_context(ca))
        c.reply()
        c.cmd("EHLO client.example")
        assert c.cmd("AUTH LOGIN")[0] == 334
        assert c.cmd(base64.b64encode(b"alice").decode())[0] == 334
        assert c.cmd(base64.b64encode(b"correct horse").decode())[0] == 235
        c.cmd("MAIL FROM:<boss@client.example>")
        theirs = c.cmd("RCPT TO:<x@far.example>")
        c.cmd("RSET")
        c.cmd("MAIL FROM:<alice@client.example>")
        mine = c.cmd("RCPT TO:<x@far.example>")
        return theirs, mine

    theirs, mine = await run(talk)
    assert theirs == (553, ["553 5.7.1 <boss@client.example>: Sender address rejected: not owned by user alice"])
    assert mine[0] == 250


def test_passwd_stores_no_plaintext(tmp_path):
    config = tmp_path / "main.cf"
    config.write_text(f"queue_directory = {tmp_path / 'q'}\nsmtpd_sasl_password_file = {tmp_path / 'pw'}\n")
    import subprocess
    import sys

    added = subprocess.run([sys.executable, "-m", "trimail", "passwd", "add", "bob", "-c", str(config)],
                           input=b"s3cret-word\n", capture_output=True, timeout=60)
    assert added.returncode == 0, added.stderr
    text = (tmp_path / "pw").read_text()
    assert text.startswith("bob:scrypt$") and "s3cret-word" not in text
    assert (tmp_path / "pw").stat().st_mode & 0o777 == 0o600
    from trimail.passwords import authenticate

    assert authenticate(tmp_path / "pw", "bob", "s3cret-word") and not authenticate(tmp_path / "pw", "bob", "x")
    assert trimail("passwd", "delete", "bob", "-c", str(config)).returncode == 0
    assert trimail("passwd", "delete", "bob", "-c", str(config)).returncode == 1
