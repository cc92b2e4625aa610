"""The SMTP client's STARTTLS: opportunistic by default, never clear text when required."""

from __future__ import annotations

import ssl

import trio
import trustme

from tests.conftest import wait_for
from tests.delivery.outbound_peer import ScriptedPeer
from tests.delivery.test_delivery import recipient_status, send, wait_empty
from tests.peers import Sink


def server_context() -> ssl.SSLContext:
    ca = trustme.CA()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1", "sink.test").configure_cert(ctx)
    return ctx


async def test_starttls_is_used_when_offered(start_mta):
    with Sink(tls_context=server_context()) as sink:
        srv = await start_mta(relayhost=f"[127.0.0.1]:{sink.port}")
        await send(srv, "a@client.example", ["r@far.example"])
        await wait_empty(srv)
        assert sink.recorder.recipients() == ["r@far.example"]
        assert sink.recorder.tls_used == [True]


async def test_encrypt_level_never_sends_in_clear(start_mta):
    with Sink() as sink:  # no STARTTLS offered
        srv = await start_mta(relayhost=f"[127.0.0.1]:{sink.port}", smtp_tls_security_level="encrypt")
        queue_id = await send(srv, "a@client.example", ["r@far.example"])
        await wait_for(lambda: recipient_status(srv, queue_id).get("r@far.example", ("",))[0] == "deferred")
        status, reply = recipient_status(srv, queue_id)["r@far.example"]
        assert reply.startswith("4.7.4 ") and "TLS is required, but was not offered" in reply
        assert sink.messages == []


async def test_bytes_pipelined_after_the_starttls_reply_abort_the_connection(start_mta, nursery):
    seen: list[bytes] = []

    async def injector(*, task_status=trio.TASK_STATUS_IGNORED):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])

        async def handle(stream):
            async with stream:
                await stream.send_all(b"220 evil ESMTP\r\n")
                while True:
                    data = await stream.receive_some(4096)
                    if not data:
                        return
                    seen.append(data)
                    if data.upper().startswith(b"EHLO"):
                        await stream.send_all(b"250-evil\r\n250 STARTTLS\r\n")
                    elif data.upper().startswith(b"STARTTLS"):
                        await stream.send_all(b"220 go ahead\r\n250 2.1.0 injected reply\r\n")

        await trio.serve_listeners(handle, listeners)

    port = await nursery.start(injector)
    srv = await start_mta(relayhost=f"[127.0.0.1]:{port}")
    queue_id = await send(srv, "a@client.example", ["r@far.example"])
    await wait_for(lambda: recipient_status(srv, queue_id).get("r@far.example", ("",))[0] == "deferred")
    assert "unexpected data after the STARTTLS reply" in recipient_status(srv, queue_id)["r@far.example"][1]
    assert not any(b"MAIL FROM" in chunk for chunk in seen)


async def test_a_stray_reply_on_a_tls_connection_is_never_the_next_messages_answer(start_mta, nursery):
    """Red team 33c: a connection whose server spoke out of turn was recognised in
    clear text only; over STARTTLS the stray 550 after a 250 still bounced the next
    message on the cached connection.  The TLS records waiting are looked at too."""
    peer = ScriptedPeer(tls=server_context(), stray=b"550 5.7.1 stray reply out of turn\r\n")
    port = await nursery.start(peer.run)
    srv = await start_mta(relayhost=f"[127.0.0.1]:{port}", smtp_connection_cache_time_limit="10s")
    for n in range(3):  # one after another: each could reuse the connection of the one before
        await send(srv, "<>", [f"r{n}@far.example"])
        await wait_empty(srv)
        # (the stray is out before the next message is queued, so the next finds it waiting)
        await wait_for(lambda n=n: len(peer.received) == n + 1 and peer.strays == n + 1, timeout=10)
    assert peer.connections == 3  # each stray condemned its connection
