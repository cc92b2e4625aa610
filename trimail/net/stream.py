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
  reads, with no extra pass after it.  (Waiting for readability first after a
  reply, when the client is reading it, would save that ``recv()``, about 1.2 us,
  for a lone client; under load the next command is often there already, and the
  wait would cost an ``epoll_ctl`` and a pass of the run loop instead: not done.)

The SMTP client of the delivery agent uses the same stream for its connections
(``DirectStream.connect``) and the non-blocking halves directly (``send_now``,
``receive_now``), so that a reply already received or a command the kernel takes
at once costs no cancel scope either (``delivery.smtp.Connection``).

Cancellation is honoured where it matters: a cancelled task raises at its next
wait, and a stream closed by another task wakes a waiting receive with
``trio.ClosedResourceError`` (``aclose`` and ``close_now`` go through trio's socket,
which notifies waiters; ``close_now`` without ``aclose``'s pass of the run loop, when
the session is over and nothing is left to wait for).  Socket errors map as trio maps them: EBADF to ``ClosedResourceError``,
the rest to ``BrokenResourceError``.
"""

from __future__ import annotations

import errno
import ipaddress
import socket

import trio

DEFAULT_RECEIVE_SIZE = 65536


class DirectStream(trio.abc.HalfCloseableStream):
    """One accepted TCP connection (*sock*: the non-blocking stdlib socket)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.socket = trio.socket.from_stdlib_socket(sock)  # (makes it non-blocking)
        self._stream = trio.SocketStream(self.socket)  # the slow paths, close, TCP_NODELAY

    @classmethod
    async def connect(cls, address: str, port: int) -> DirectStream:
        """A TCP connection to *address* (an IP address literal), *port*."""
        family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            stream = cls(sock)
            await stream.socket.connect((address, port))
        except BaseException:
            sock.close()
            raise
        return stream

    def send_now(self, data: bytes | bytearray | memoryview) -> int:
        """Send what the kernel takes without waiting; how many bytes that was."""
        try:
            return self._sock.send(data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise _stream_error(exc) from exc

    def receive_now(self, max_bytes: int = DEFAULT_RECEIVE_SIZE) -> bytes | None:
        """Bytes already received (``b""``: the peer closed), or None when none are waiting."""
        try:
            return self._sock.recv(max_bytes)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise _stream_error(exc) from exc

    def waiting(self) -> bool:
        """Is anything received and not yet read (bytes, or the peer's close)?  Nothing
        is taken: what waits may be TLS records for the stream above this one."""
        try:
            self._sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return False
        except OSError:
            return True  # (an error waits for the next read)
        return True

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        sent = self.send_now(data)
        if sent < len(data):
            await self._stream.send_all(memoryview(data)[sent:])

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        size = max_bytes or DEFAULT_RECEIVE_SIZE
        data = self.receive_now(size)
        if data is not None:
            await trio.lowlevel.checkpoint()
            return data
        while data is None:
            await trio.lowlevel.wait_readable(self._sock)
            data = self.receive_now(size)
        return data

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()

    def close_now(self) -> None:
        """Close without the pass of the run loop that ``aclose`` adds after it (trio's
        socket still wakes a task waiting on it: ``ClosedResourceError``)."""
        self.socket.close()


def _stream_error(exc: OSError) -> trio.BrokenResourceError | trio.ClosedResourceError:
    if exc.errno == errno.EBADF:
        return trio.ClosedResourceError("this socket was already closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")
