"""The SMTP client's STARTTLS: opportunistic by default, never clear text when required."""

from __future__ import annotations

import ssl

import trio
import trustme

from tests.conftest import wait_for
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
    ctx = server_context()
    received: list[int] = []
    strays: list[int] = []  # sent after the 250, before the next message is queued

    async def peer(*, task_status=trio.TASK_STATUS_IGNORED):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])

        async def handle(raw):
            stream, buf = raw, bytearray()

            async def line() -> bytes:
                while b"\r\n" not in buf:
                    data = await stream.receive_some(65536)
                    if not data:
                        raise trio.BrokenResourceError
                    buf.extend(data)
                end = buf.index(b"\r\n")
                out = bytes(buf[:end])
                del buf[:end + 2]
                return out

            try:
                await stream.send_all(b"220 peer ESMTP\r\n")
                while True:
                    verb = (await line())[:4].upper()
                    if verb == b"EHLO":
                        await stream.send_all(b"250-peer\r\n250-PIPELINING\r\n250 STARTTLS\r\n" if stream is raw
                                              else b"250-peer\r\n250 PIPELINING\r\n")
                    elif verb == b"STAR":
                        await stream.send_all(b"220 go ahead\r\n")
                        stream = trio.SSLStream(raw, ctx, server_side=True)
                        await stream.do_handshake()
                    elif verb == b"DATA":
                        await stream.send_all(b"354 go ahead\r\n")
                        while await line() != b".":
                            pass
                        received.append(1)
                        await stream.send_all(b"250 2.0.0 accepted\r\n")
                        await trio.sleep(0.1)
                        await stream.send_all(b"550 5.7.1 stray reply out of turn\r\n")
                        strays.append(1)
                    elif verb == b"QUIT":
                        await stream.send_all(b"221 bye\r\n")
                        return
                    else:
                        await stream.send_all(b"250 ok\r\n")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

        await trio.serve_listeners(handle, listeners)

    port = await nursery.start(peer)
    srv = await start_mta(relayhost=f"[127.0.0.1]:{port}", smtp_connection_cache_time_limit="10s")
    for n in range(3):  # one after another: each could reuse the connection of the one before
        await send(srv, "<>", [f"r{n}@far.example"])
        await wait_empty(srv)
        await wait_for(lambda n=n: len(received) == n + 1 and len(strays) == n + 1, timeout=10)
