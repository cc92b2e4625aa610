"""trimail.net.listener.DeferredAccept over a real loopback listening socket."""

from __future__ import annotations

import socket

import pytest
import trio

from trimail.net.listener import DeferredAccept


@pytest.mark.parametrize("busy", [False, True])
async def test_deferred_accept_takes_every_connection_of_a_burst_busy_or_not(busy: bool) -> None:
    """After each connection the accept loop waits for readability (not busy) or tries
    at once after a checkpoint (busy): either way none of a burst is left waiting,
    and with nothing pending it waits instead of returning."""
    sock = socket.create_server(("127.0.0.1", 0))
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    deferred = DeferredAccept(listener, busy=lambda: busy)
    clients = [socket.create_connection(sock.getsockname()) for _ in range(5)]
    try:
        with trio.fail_after(5):
            streams = [await deferred() for _ in clients]
        assert sorted(s.socket.getpeername() for s in streams) == sorted(c.getsockname() for c in clients)
        with trio.move_on_after(0.2) as waited:
            await deferred()
        assert waited.cancelled_caught  # nothing pending: it waits
        late = socket.create_connection(sock.getsockname())
        with trio.fail_after(5):
            stream = await deferred()
        assert stream.socket.getpeername() == late.getsockname()
        clients.append(late)
        for accepted in [*streams, stream]:
            accepted.close_now()
    finally:
        deferred.close()
        for client in clients:
            client.close()
        sock.close()
