"""The sending side against Postfix's own smtp-sink: a server without 8BITMIME or
SMTPUTF8 (``-8``; this smtp-sink never offers SMTPUTF8), and one that answers EHLO
with our own name (``-h``)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.delivery.outbound_peer import ScriptedPeer
from tests.delivery.test_delivery import parse_dsn, queue, send, wait_empty
from tests.delivery.test_outbound_8bit import EIGHT_BIT_MESSAGE
from tests.delivery.test_outbound_8bit import send as send_with_options
from tests.ports import free_port

pytestmark = pytest.mark.skipif(not shutil.which("smtp-sink"), reason="Postfix's smtp-sink is not installed")


class SmtpSink:
    def __init__(self, directory: Path, host: str, port: int, *options: str) -> None:
        directory.mkdir(exist_ok=True)
        directory.chmod(0o777)  # smtp-sink writes as nobody
        self.directory = directory
        self.host, self.port = host, port
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        self.proc = subprocess.Popen(["smtp-sink", *user, *options, "-d", f"{directory}/%M.",
                                      f"{host}:{port}", "10"], stderr=subprocess.PIPE)

    def ready(self) -> bool:
        assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else ""
        try:
            socket.create_connection((self.host, self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def dumps(self) -> list[bytes]:
        return [path.read_bytes() for path in sorted(self.directory.iterdir())]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def smtp_sink() -> Iterator:
    sinks: list[SmtpSink] = []
    # not under tmp_path: smtp-sink runs as nobody, who cannot enter pytest's 0700 directories
    top = Path(tempfile.mkdtemp(prefix="trimail-smtp-sink-"))
    top.chmod(0o711)

    async def start(*options: str, host: str = "127.0.0.1", port: int = 0) -> SmtpSink:
        if not port:
            port = free_port(host)
        sink = SmtpSink(top / f"sink{len(sinks)}", host, port, *options)
        sinks.append(sink)
        await wait_for(sink.ready, timeout=10)
        return sink

    yield start
    for sink in sinks:
        sink.stop()
    shutil.rmtree(top, ignore_errors=True)


async def test_8bit_mail_reaches_smtp_sink_without_8bitmime_as_quoted_printable(start_mta, smtp_sink):
    sink = await smtp_sink("-8")
    srv = await start_mta(relayhost=f"[127.0.0.1]:{sink.port}")
    await send_with_options(srv, ["bob@far.example"], EIGHT_BIT_MESSAGE, ["BODY=8BITMIME"])
    await wait_empty(srv)
    await wait_for(lambda: any(b"x" * 27 + b"\n" in dump for dump in sink.dumps()), timeout=10)
    [dump] = sink.dumps()
    assert b"X-Mail-Args: <alice@client.example>\n" in dump  # no BODY=, no SIZE=
    assert dump.isascii()
    assert b"Content-Transfer-Encoding: quoted-printable\n\ncaf=C3=A9 =3D 2=E2=82=AC =20\n" in dump


async def test_a_utf8_recipient_bounces_5_6_7_at_smtp_sink(start_mta, smtp_sink, nursery):
    sink = await smtp_sink("-8")
    senders = ScriptedPeer()
    senders_port = await nursery.start(senders.run)
    srv = await start_mta(relayhost=f"[127.0.0.1]:{sink.port}",
                          transport_maps=f"inline:{{ client.example=smtp:[127.0.0.1]:{senders_port} }}")
    await send_with_options(srv, ["rené@far.example"], b"Subject: x\r\n\r\ny\r\n", ["SMTPUTF8"])
    await wait_empty(srv)
    assert sink.dumps() == []
    [dsn] = senders.received
    assert "Final-Recipient: utf-8; rené@far.example\r\nOriginal-Recipient: utf-8; rené@far.example\r\n" \
           "Action: failed\r\nStatus: 5.6.7" in dsn.data.decode()


async def test_smtp_sink_answering_ehlo_with_my_hostname_on_port_25_is_a_loop(start_mta, smtp_sink, nursery):
    if os.geteuid() != 0:
        pytest.skip("port 25 needs root")
    sink = None
    for third in range(30, 60):
        host = f"127.{os.getpid() % 200 + 20}.{third}.25"
        try:
            sink = await smtp_sink("-h", "MX.test.example", host=host, port=25)
            break
        except AssertionError:  # that address's port 25 is taken: the next one
            continue
    assert sink is not None
    senders = ScriptedPeer()
    senders_port = await nursery.start(senders.run)
    srv = await start_mta(relayhost=f"[{sink.host}]",
                          transport_maps=f"inline:{{ client.example=smtp:[127.0.0.1]:{senders_port} }}")
    await send(srv, "alice@client.example", ["r@far.example"])
    await wait_empty(srv)
    assert sink.dumps() == [] and not queue(srv)
    message, recipients, _ = parse_dsn(senders.received[0].data)
    assert recipients == [("rfc822; r@far.example", "failed", "5.4.6")]
    assert f"mail for {sink.host} loops back to myself" in message.as_string()
