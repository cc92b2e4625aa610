"""Mail exchanged with a real Postfix on loopback, in both directions, in the clear and over TLS."""

from __future__ import annotations

import shutil
import smtplib
import tempfile
from pathlib import Path

import pytest
import trio
import trustme

from tests import postfix_peer
from tests.delivery.test_delivery import send, wait_empty
from tests.peers import Sink
from tests.ports import free_port
from trimail.testing import TestMTA

pytestmark = pytest.mark.skipif(not postfix_peer.available(), reason="needs root and Debian's postfix package")


@pytest.fixture
def postfix():
    started = []

    workdirs: list[Path] = []

    def start(relay_port: int, extra: str = "") -> postfix_peer.Postfix:
        workdirs.append(Path(tempfile.mkdtemp(prefix="trimail-interop-")))
        peer = postfix_peer.Postfix(workdirs[-1], free_port(), relay_port, extra)
        started.append(peer)
        return peer

    yield start
    for peer in started:
        peer.stop()
    for workdir in workdirs:
        shutil.rmtree(workdir, ignore_errors=True)


async def test_trimail_relays_through_a_real_postfix(start_mta, postfix):
    with Sink() as sink:
        peer = await trio.to_thread.run_sync(postfix, sink.port)
        srv = await start_mta(relayhost=f"[127.0.0.1]:{peer.port}")
        queue_id = await send(srv, "a@client.example", ["ann@far.example", "bob@far.example"],
                              "Subject: via postfix\r\n\r\nline\r\n.dot line\r\n")
        await wait_empty(srv)
        deadline = trio.current_time() + 60
        while not sink.messages:
            assert trio.current_time() < deadline, "Postfix did not pass the message on"
            await trio.sleep(0.05)
        [(sender, rcpts, content)] = sink.messages
        assert sender == "a@client.example" and sorted(rcpts) == ["ann@far.example", "bob@far.example"]
        assert queue_id.encode() in content and b"by bench-postfix.example (Postfix)" in content
        assert content.endswith(b"line\r\n.dot line\r\n")


def test_a_real_postfix_relays_to_trimail(postfix):
    with TestMTA() as mta:
        peer = postfix(mta.port)
        with smtplib.SMTP("127.0.0.1", peer.port, timeout=30) as client:
            client.sendmail("a@client.example", ["ann@far.example"], "Subject: from postfix\r\n\r\nx\r\n")
        [message] = mta.wait_for(timeout=60)
        assert message.sender == "a@client.example" and message.recipients == ["ann@far.example"]
        assert message.helo == "bench-postfix.example" and "(Postfix)" in message.raw.decode()


def write_cert(ca: trustme.CA, directory: Path, *names: str) -> tuple[Path, Path]:
    cert = ca.issue_cert(*names)
    cert_file, key_file = directory / "tls-cert.pem", directory / "tls-key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    return cert_file, key_file


def strip_received(raw: bytes, count: int) -> tuple[list[bytes], bytes]:
    """The first *count* Received: fields of *raw* (each with its folded lines) and the rest."""
    fields: list[bytes] = []
    while len(fields) < count and raw.startswith(b"Received:"):
        end = raw.index(b"\r\n")
        while raw[end + 2:end + 3] in (b" ", b"\t"):
            end = raw.index(b"\r\n", end + 2)
        fields.append(raw[:end + 2])
        raw = raw[end + 2:]
    return fields, raw


async def test_round_trip_trimail_postfix_trimail_with_tls_both_ways_is_byte_for_byte(start_mta, postfix, tmp_path):
    """trimail -> Postfix -> trimail, TLS verified on both hops, SMTPUTF8 and 8BITMIME
    end to end: the content arrives unchanged except for the three Received: fields."""
    from trimail.testing import open_test_mta

    message = (b"Received: from an.earlier.hop (198.51.100.7)\r\n"
               b"\tby relay.example; Tue, 24 Nov 2026 10:00:00 +0000\r\n"
               b"From: =?utf-8?q?J=C3=B6rg?= <j\xc3\xb6rg@b\xc3\xbccher.example>\r\n"
               b"To: ann@far.example\r\nDate: Wed, 25 Nov 2026 12:00:00 +0000\r\n"
               b"Message-ID: <round-trip.1@b\xc3\xbccher.example>\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
               b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
               b"\r\n"
               + "Grüße aus Köln, ½ € — 8-bit text, and bytes of every high value:\r\n".encode()
               + bytes(range(0x80, 0x100)).decode("latin-1").encode() + b"\r\n"
               + b"y" * 998 + b"\r\n"               # the longest line RFC 5321 allows
               + b".a dot at line start\r\n..two\r\n.\t.\r\n"
               + b"trailing spaces   \r\n\tleading tab\r\n"
               + b"\r\n\r\n"                        # empty lines at the end survive too
               )
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    async with open_test_mta(tls=True) as last:
        certs = tmp_path / "postfix-tls"
        certs.mkdir()
        certs.chmod(0o755)
        cert_file, key_file = write_cert(ca, certs, "127.0.0.1", "bench-postfix.example")
        policy = certs / "tls_policy"
        policy.write_text(f"[127.0.0.1]:{last.port} verify match=localhost\n")
        peer = await trio.to_thread.run_sync(lambda: postfix(last.port, (
            f"smtpd_tls_cert_file = {cert_file}\nsmtpd_tls_key_file = {key_file}\n"
            "smtpd_tls_security_level = may\nsmtpd_tls_received_header = yes\nsmtpd_tls_loglevel = 1\n"
            f"smtp_tls_CAfile = {last.ca_file}\nsmtp_tls_security_level = encrypt\n"
            f"smtp_tls_policy_maps = texthash:{policy}\nsmtp_tls_loglevel = 1\n")))
        first = await start_mta(relayhost=f"[127.0.0.1]:{peer.port}", smtp_tls_security_level="verify",
                                smtp_tls_CAfile=str(ca_file))

        def submit() -> None:
            with smtplib.SMTP("127.0.0.1", first.addresses[0].port, timeout=30) as client:
                client.ehlo("client.example")
                client.sendmail("jörg@bücher.example", ["ann@far.example"], message,
                                mail_options=["SMTPUTF8", "BODY=8BITMIME"])

        await trio.to_thread.run_sync(submit)
        [got] = await last.wait_for(timeout=60)
        await wait_empty(first)
    assert got.sender == "jörg@bücher.example" and got.recipients == ["ann@far.example"]
    assert got.tls and got.protocol == "UTF8SMTPS" and got.helo == "bench-postfix.example"
    added, rest = strip_received(got.raw, 3)
    assert rest == message, "content changed in transit"
    # ours (the last hop), Postfix's (with the TLS it received over), ours (the first hop), the original
    ours_last, postfix_hop, ours_first = added[0], added[1], added[2]
    assert ours_last.startswith(b"Received: from bench-postfix.example") and b"(using TLSv1." in ours_last
    assert b"by bench-postfix.example (Postfix) with UTF8SMTPS" in postfix_hop
    assert b"(using TLSv1." in postfix_hop  # smtpd_tls_received_header: the hop from trimail was encrypted
    assert ours_first.startswith(b"Received: from client.example")
    log = (peer.dir / "maillog").read_text()
    assert f"Verified TLS connection established to 127.0.0.1[127.0.0.1]:{last.port}" in log, log
    assert "TLS connection established from localhost[127.0.0.1]" in log, log
