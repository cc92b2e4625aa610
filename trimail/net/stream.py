"""An SMTP session's connection: trio's ``SocketStream`` without the scheduler pass
when the kernel can take or give the bytes at once.

trio makes every socket operation a checkpoint: a ``send_all`` that the kernel
takes whole still yields to the scheduler afterwards (``cancel_shielded_checkpoint``,
one pass of the run loop with its ``epoll_wait``), and so does a receive that found
data waiting.  An SMTP server answers every command with one short reply, which the
kernel always takes at once, and then waits for the next command: that pass costs
about 10-20 us of Python per reply, seven replies per one-message connection, for
nothing -- the wait for the next command follows at once and is a checkpoint
itself.  ``DirectStream`` therefore:

* sends with one non-blocking ``send()``; only what the kernel did not take goes
  through trio's ``send_all`` (which waits until the socket is writable);
* receives with one non-blocking ``recv()``; data found waiting is returned after a
  checkpoint as trio does (a client that pipelines without pause cannot keep the
  task from yielding), and when nothing is waiting it waits for readability and
  reads, with no extra pass after it.

Cancellation is honoured where it matters: a cancelled task raises at its next
wait, and a stream closed by another task wakes a waiting receive with
``trio.ClosedResourceError`` (``aclose`` goes through trio's socket, which notifies
waiters).  Socket errors map as trio maps them: EBADF to ``ClosedResourceError``,
the rest to ``BrokenResourceError``.
"""

from __future__ import annotations

import errno
import socket

import trio

DEFAULT_RECEIVE_SIZE = 65536


class DirectStream(trio.abc.HalfCloseableStream):
    """One accepted TCP connection (*sock*: the non-blocking stdlib socket)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self.socket = trio.socket.from_stdlib_socket(sock)
        self._stream = trio.SocketStream(self.socket)  # the slow paths, close, TCP_NODELAY

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            sent = self._sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise _stream_error(exc) from exc
        if sent < len(data):
            await self._stream.send_all(memoryview(data)[sent:])

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        size = max_bytes or DEFAULT_RECEIVE_SIZE
        try:
            data = self._sock.recv(size)
        except BlockingIOError:
            pass
        except OSError as exc:
            raise _stream_error(exc) from exc
        else:
            await trio.lowlevel.checkpoint()
            return data
        while True:
            await trio.lowlevel.wait_readable(self._sock)
            try:
                return self._sock.recv(size)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise _stream_error(exc) from exc

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


def _stream_error(exc: OSError) -> trio.BrokenResourceError | trio.ClosedResourceError:
    if exc.errno == errno.EBADF:
        return trio.ClosedResourceError("this socket was already closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")
