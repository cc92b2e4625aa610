"""trimail.net.stream.DirectStream over real loopback TCP connections."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from trimail.net.stream import DirectStream


def _pair() -> tuple[socket.socket, socket.socket]:
    """(client, accepted) TCP sockets on loopback, both blocking as accept() gives them."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
    accepted.setblocking(True)
    return client, accepted


async def test_an_accepted_socket_becomes_non_blocking_and_carries_bytes_both_ways() -> None:
    client, accepted = _pair()
    with client:
        stream = DirectStream(accepted)
        assert accepted.getblocking() is False  # trio's socket made it so: nothing here may block the loop
        assert stream.receive_now() is None  # nothing sent yet: no wait, no data
        await stream.send_all(b"220 ready\r\n")
        assert client.recv(100) == b"220 ready\r\n"
        client.sendall(b"EHLO a.example\r\n")
        with trio.fail_after(5):
            assert await stream.receive_some() == b"EHLO a.example\r\n"
        stream.close_now()


async def test_a_receive_waits_for_data_and_close_now_wakes_it() -> None:
    client, accepted = _pair()
    with client:
        stream = DirectStream(accepted)
        got: list[bytes] = []

        async def receive() -> None:
            got.append(await stream.receive_some())

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive)
                await trio.testing.wait_all_tasks_blocked()
                assert got == []  # waiting, not returning empty-handed
                client.sendall(b"QUIT\r\n")
            assert got == [b"QUIT\r\n"]
            failed: list[BaseException] = []

            async def receive_closed() -> None:
                with pytest.raises(trio.ClosedResourceError) as info:
                    await stream.receive_some()
                failed.append(info.value)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive_closed)
                await trio.testing.wait_all_tasks_blocked()
                stream.close_now()
            assert len(failed) == 1  # the waiting receive was woken, with ClosedResourceError
