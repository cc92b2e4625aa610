"""A TLS connection's close is bounded (net.tls.close_within): close_notify waits
while the peer does not read, and the close is shielded from a stop, so without a
bound a session or a delivery whose peer stopped reading held up serve's stop for
ever (red team 33a's lead).  A real TLS session (trustme's certificates) over trio's
lockstep stream pair, whose sends wait until the other side reads."""

from __future__ import annotations

import ssl

import trio
import trio.testing

from trimail.net.tls import close_within


async def test_a_tls_close_whose_peer_never_reads_ends_within_its_bound(ca):
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mx.test.example").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    client_raw, server_raw = trio.testing.lockstep_stream_pair()
    server = trio.SSLStream(server_raw, server_ctx, server_side=True)
    client = trio.SSLStream(client_raw, client_ctx, server_hostname="mx.test.example")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        nursery.start_soon(client.do_handshake)
    # the client reads nothing from now on: the server's close_notify cannot be sent
    began = trio.current_time()
    with trio.fail_after(10):
        await close_within(server, 1.0)
    assert trio.current_time() - began < 5
    await client_raw.aclose()
