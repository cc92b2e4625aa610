"""Peers for queue-manager tests that run beside a ``trimail serve`` child: a DNS
server and SMTP peers, each on its own trio loop in a thread of the test process."""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Self

import apsw
import trio

from tests.dnsserver import run_dns_server


class InThread:
    """Runs ``fn(*args, task_status=...)`` with trio in a daemon thread until stop();
    ``started`` is what it passed to task_status.started()."""

    def __init__(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        self._fn, self._args = fn, args
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel: trio.CancelScope | None = None
        self.started: Any = None
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as self._cancel:
            async with trio.open_nursery() as nursery:
                self.started = await nursery.start(self._fn, *self._args)
                self._ready.set()

    def __enter__(self) -> Self:
        self._thread.start()
        assert self._ready.wait(10), "peer did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._token is not None and self._cancel is not None
        self._token.run_sync_soon(self._cancel.cancel)
        self._thread.join(10)


def dns_server(zone: dict, host: str) -> InThread:
    """A DNS server on *host* (UDP) answering *zone*; its port is ``.started``."""
    return InThread(run_dns_server, zone, host)


class CountingPeer:
    """A minimal SMTP server on (host, port) that accepts every message and counts
    the connections open at once (``most_open``) and the messages (``delivered``)."""

    def __init__(self, host: str, port: int = 25) -> None:
        self.host, self.port = host, port
        self.open_now = 0
        self.most_open = 0
        self.connections = 0
        self.delivered = 0
        self.recipients: list[str] = []
        self.arrivals: list[tuple[float, str]] = []  # (time, recipient) of each delivered recipient

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host=self.host, backlog=1024)
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            async with stream:
                await self._converse(stream)
        except trio.BrokenResourceError:
            pass
        finally:
            self.open_now -= 1

    async def _converse(self, stream: trio.SocketStream) -> None:
        buf = b""

        async def line() -> bytes:
            nonlocal buf
            while b"\r\n" not in buf:
                data = await stream.receive_some(65536)
                if not data:
                    raise trio.BrokenResourceError
                buf += data
            out, buf = buf.split(b"\r\n", 1)
            return out

        await stream.send_all(b"220 peer ESMTP\r\n")
        envelope: list[str] = []
        while True:
            command = (await line()).upper()
            if command.startswith((b"EHLO", b"HELO")):
                await stream.send_all(b"250-peer\r\n250 PIPELINING\r\n")
            elif command.startswith(b"RCPT TO:"):
                envelope.append(command[8:].strip(b"<>").decode().lower())
                await stream.send_all(b"250 2.1.5 Ok\r\n")
            elif command.startswith(b"DATA"):
                await stream.send_all(b"354 go ahead\r\n")
                while await line() != b".":
                    pass
                self.delivered += 1
                self.recipients += envelope
                self.arrivals += [(time.time(), address) for address in envelope]
                envelope = []
                await stream.send_all(b"250 2.0.0 Ok\r\n")
            elif command.startswith(b"QUIT"):
                await stream.send_all(b"221 2.0.0 Bye\r\n")
                return
            else:  # MAIL, RSET, NOOP
                envelope = [] if command.startswith((b"MAIL", b"RSET")) else envelope
                await stream.send_all(b"250 2.0.0 Ok\r\n")


class Tarpit:
    """Accepts connections on (host, port) and never says a word: every delivery to
    it hangs until the client's own timeout.  ``open_now`` counts the connections."""

    def __init__(self, host: str, port: int = 25) -> None:
        self.host, self.port = host, port
        self.open_now = 0
        self.connections = 0

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host=self.host, backlog=1024)
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        self.open_now += 1
        try:
            async with stream:
                while await stream.receive_some(4096):
                    pass
        except trio.BrokenResourceError:
            pass
        finally:
            self.open_now -= 1


def queue_states(queue_directory: Path) -> dict[str, int]:
    """Messages per state, read beside a running serve (a read-only connection)."""
    db = apsw.Connection(str(queue_directory / "queue.db"), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return dict(db.execute("SELECT state, count(*) FROM message GROUP BY state").fetchall())
    finally:
        db.close()
