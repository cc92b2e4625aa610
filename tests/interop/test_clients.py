"""Real SMTP clients against trimail: msmtp, swaks and Python's smtplib."""

from __future__ import annotations

import shutil
import smtplib
import ssl
import subprocess

import pytest
import trio

from trimail.queue.store import Store
from trimail.testing import TestMTA

needs_swaks = pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed (CI installs it)")

# 8-bit UTF-8 text, a line of the longest length RFC 5321 allows (998 octets),
# and a line starting with a dot that the client must stuff and we must unstuff.
EIGHT_BIT_BODY = ("Grüße aus Köln, ½ € — 8-bit text\r\n"
                  + "x" * 998 + "\r\n"
                  + ".a line that starts with a dot\r\n"
                  + "..two dots\r\n").encode()


@pytest.mark.skipif(shutil.which("msmtp") is None, reason="msmtp is not installed (CI installs it)")
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "starttls+auth"])
def test_msmtp_submits_to_trimail(tmp_path, tls):
    options = {"tls": True, "auth": {"app": "s3cret"}} if tls else {}
    with TestMTA(**options) as mta:
        args = ["msmtp", "--host=127.0.0.1", f"--port={mta.port}", "--from=app@client.example",
                "--domain=client.example"]
        if tls:
            args += ["--tls=on", "--tls-starttls=on", f"--tls-trust-file={mta.ca_file}", "--auth=plain",
                     "--user=app", "--passwordeval=echo s3cret"]
        else:
            args += ["--tls=off", "--auth=off"]
        result = subprocess.run([*args, "ann@far.example"], input=b"Subject: from msmtp\n\nhello\n",
                                capture_output=True, timeout=60)
        assert result.returncode == 0, result.stderr.decode()
        [message] = mta.wait_for(subject="from msmtp")
        assert message.sender == "app@client.example" and message.recipients == ["ann@far.example"]
        assert message.helo == "client.example"
        if tls:
            assert message.auth == "app" and message.tls


def swaks(port: int, *args: str, data: bytes | None = None, ca_file: str | None = None) -> subprocess.CompletedProcess:
    command = ["swaks", "--server", "127.0.0.1", "--port", str(port), "--helo", "client.example", *args]
    if ca_file:
        command += ["--tls", "--tls-verify", "--tls-ca-path", ca_file]
    if data is not None:
        command += ["--data", "-"]
    return subprocess.run(command, input=data, capture_output=True, timeout=60)


@needs_swaks
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_swaks_on_submission_with_starttls_auth_pipelining_and_8bit(submission, ca, tmp_path, mechanism):
    srv = await submission()
    port = srv.addresses_by_kind["submission"][0].port
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    headers = (b"From: Alice <alice@client.example>\r\nTo: bob@far.example, carol@far.example\r\n"
               b"Subject: swaks 8bit\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
               b"Content-Transfer-Encoding: 8bit\r\n\r\n")
    result = await trio.to_thread.run_sync(lambda: swaks(
        port, "--pipeline", "--auth", mechanism, "--auth-user", "alice", "--auth-password", "correct horse",
        "--from", "alice@client.example", "--to", "bob@far.example,carol@far.example",
        data=(headers + EIGHT_BIT_BODY).removesuffix(b"\r\n"),  # swaks ends the last line itself
        ca_file=str(ca_file)))
    transcript = result.stdout.decode("utf-8", "replace")
    assert result.returncode == 0, transcript + result.stderr.decode()
    assert "250-PIPELINING" in transcript and "<~  235 2.7.0 Authentication successful" in transcript
    # swaks pipelined MAIL, both RCPTs and DATA: its transcript shows them sent before any reply
    assert "~> MAIL FROM:<alice@client.example>\n ~> RCPT TO:<bob@far.example>" in transcript
    queue_id = transcript.split(" queued as ")[1].split()[0]
    store = Store.open(srv.config.queue_directory, readonly=True)
    try:
        info = store.get_message(queue_id)
        content = store.read_content(queue_id)
    finally:
        store.close()
    assert info is not None and info.sender == "alice@client.example"
    assert sorted(r.address for r in info.recipients) == ["bob@far.example", "carol@far.example"]
    received, rest = content.split(b"\r\n", 1)[0], content.split(b"\r\n", 1)[1]
    assert received.startswith(b"Received: from client.example")
    assert rest.split(b"\r\n\t", 1)[0].count(b"\r\n") <= 3  # the Received: header is folded, not split
    assert content.endswith(headers + EIGHT_BIT_BODY), content[-1500:]
    assert b"with ESMTPSA id" in content  # RFC 3848: ESMTP, TLS, authenticated


@needs_swaks
async def test_swaks_with_an_undeclared_utf8_address_is_told_to_declare_smtputf8(submission):
    # swaks (20201014) cannot send the SMTPUTF8 parameter; a UTF-8 address without it
    # gets Postfix's answer for the same mistake (RFC 6531 3.4)
    port = (await submission()).addresses[0].port
    result = await trio.to_thread.run_sync(lambda: swaks(
        port, "--from", "jörg@client.example", "--to", "ann@mx.test.example"))
    transcript = result.stdout.decode("utf-8", "replace")
    assert result.returncode != 0
    assert "<** 553 5.6.7 Must declare SMTPUTF8 to send unicode address" in transcript


def test_smtplib_with_smtputf8_and_8bitmime_over_starttls():
    with TestMTA(tls=True) as mta:
        message = (b"From: =?utf-8?q?J=C3=B6rg?= <j\xc3\xb6rg@b\xc3\xbccher.example>\r\n"
                   b"To: \xe5\xbc\xa0\xe4\xbc\x9f@\xe4\xbe\x8b\xe5\xad\x90.example\r\nSubject: utf8\r\n"
                   b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
                   b"Content-Transfer-Encoding: 8bit\r\n\r\n" + EIGHT_BIT_BODY)
        with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as client:
            client.ehlo("client.example")
            assert client.has_extn("smtputf8") and client.has_extn("8bitmime")
            client.starttls(context=ssl.create_default_context(cafile=mta.ca_file))
            client.ehlo("client.example")
            refused = client.sendmail("jörg@bücher.example", ["张伟@例子.example"], message,
                                      mail_options=["SMTPUTF8", "BODY=8BITMIME"])
        assert refused == {}
        [got] = mta.wait_for()
        assert got.sender == "jörg@bücher.example" and got.recipients == ["张伟@例子.example"]
        assert got.tls and got.protocol == "UTF8SMTPS"
        assert got.raw.endswith(message)
