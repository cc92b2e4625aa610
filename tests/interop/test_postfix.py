"""Mail exchanged with a real Postfix on loopback, in both directions."""

from __future__ import annotations

import smtplib
import socket
import tempfile
from pathlib import Path

import pytest

from tests import postfix_peer
from tests.delivery.test_delivery import send, wait_empty
from tests.peers import Sink
from trimail.testing import TestMTA

pytestmark = pytest.mark.skipif(not postfix_peer.available(), reason="needs root and Debian's postfix package")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def postfix():
    started = []

    def start(relay_port: int) -> postfix_peer.Postfix:
        workdir = Path(tempfile.mkdtemp(prefix="trimail-interop-"))
        peer = postfix_peer.Postfix(workdir, free_port(), relay_port)
        started.append(peer)
        return peer

    yield start
    for peer in started:
        peer.stop()


async def test_trimail_relays_through_a_real_postfix(start_mta, postfix):
    import trio

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
