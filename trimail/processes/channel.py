"""One JSON line per message between the master and one worker process.

The master makes a ``socketpair`` per worker and passes one end to it.  Its first
word is ``GO``, written once it knows the process is the one it started (the fork
server answered with its pid, or the new interpreter runs): a worker waits for it
before it does anything (``await_go``), so a fork that came after the master gave
up on it -- and started another -- reads the end of the channel instead and
exits without having touched the queue.  The worker first says ``{"ready": ...}``
once it accepts work, then answers each
request (``{"cmd": NAME, "id": N, ...}``) with one line (``{"id": N, "ok": VALUE}``
or ``{"id": N, "error": TEXT}``).  Requests are made one at a time (the master
holds a lock per worker); the id is for a request the master gave up waiting on
(a stopped or busy worker): its late answer is skipped, never taken as the
answer to the next request.  A line is bounded (``MAX_LINE``:
a metrics exposition of many destinations fits); a longer one, or EOF, ends the
channel, and the other side treats the process as gone.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

import trio

MAX_LINE = 16 << 20
GO = b'{"go":true}\n'


def await_go(fd: int, timeout: float) -> bool:
    """In a worker, before anything else: whether the master's first word on the
    channel *fd* is ``GO`` within *timeout* (False: the channel ended, or nothing
    came).  Read a byte at a time, so nothing after it is taken from the channel."""
    sock = socket.socket(fileno=os.dup(fd))
    line = b""
    try:
        sock.settimeout(timeout)
        while not line.endswith(b"\n") and len(line) < len(GO):
            byte = sock.recv(1)
            if not byte:
                return False
            line += byte
    except OSError:
        return False
    finally:
        sock.close()
    return line == GO


class ChannelClosed(Exception):
    """The other end closed the channel, or broke its framing."""


class Channel:
    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        self._buffer = bytearray()
        self._sending = trio.Lock()

    @classmethod
    def from_fd(cls, fd: int) -> Channel:
        return cls(socket.socket(fileno=fd))

    async def send(self, message: dict[str, Any]) -> None:
        line = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        async with self._sending:
            try:
                await self.stream.send_all(line)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ChannelClosed(str(exc)) from None

    async def receive(self) -> dict[str, Any]:
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[:end + 1]
                try:
                    message = json.loads(line)
                except ValueError:
                    raise ChannelClosed("not a JSON line") from None
                if not isinstance(message, dict):
                    raise ChannelClosed("not a JSON object")
                return message
            if len(self._buffer) > MAX_LINE:
                raise ChannelClosed("line too long")
            try:
                data = await self.stream.receive_some(1 << 16)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ChannelClosed(str(exc)) from None
            if not data:
                raise ChannelClosed("end of file")
            self._buffer += data

    async def aclose(self) -> None:
        await self.stream.aclose()
