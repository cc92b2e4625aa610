"""SMTP peers that behave like large mailbox providers do towards a gateway, for the
queue manager's tests: each one counts, at the peer, what the gateway did to it.

- ``LimitedPeer``: allows ``max_sessions`` concurrent sessions and greets any
  connection beyond that with ``421 4.7.0 Too many concurrent SMTP connections``
  (Microsoft 365, Gmail and Yahoo do this); ``delay`` makes each message slow, so
  a backlog builds.  Counts sessions, refusals and the most sessions at once.
- ``DeadPeer``: accepts connections, counts them and never says a word (a hung
  site: the client's ``smtp_helo_timeout`` ends each attempt).
- ``SoftPeer``: a normal peer that answers ``rcpt_reply`` (e.g. a 450) to every
  RCPT while ``soft`` is set, or drops the connection at DATA while ``drop`` is set.
"""

from __future__ import annotations

import trio

TOO_MANY = b"421 4.7.0 Too many concurrent SMTP connections; try again later\r\n"


class _Lines:
    """CRLF lines from a stream (bounded: a line past 1 MiB ends the connection)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            data = await self.stream.receive_some(65536)
            if not data or len(self.buf) > 1 << 20:
                raise trio.BrokenResourceError
            self.buf.extend(data)
        end = self.buf.index(b"\r\n")
        out = bytes(self.buf[:end])
        del self.buf[:end + 2]
        return out


class SmtpPeer:
    """A small SMTP server (no PIPELINING) recording the recipients of each message."""

    name = b"peer.test"

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.connections = 0  # TCP connections accepted
        self.sessions = 0  # connections greeted with 220
        self.open_sessions = 0
        self.most_sessions = 0  # the most sessions open at once
        self.delivered: list[list[str]] = []
        self.refused_rcpts = 0
        self.rcpt_reply: bytes | None = None  # answer every RCPT with this while set
        self.drop_at_data = False  # vanish at DATA while set

    async def run(self, host: str, port: int = 0, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._handle, listeners)

    def recipients(self) -> list[str]:
        return [r for rcpts in self.delivered for r in rcpts]

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        async with stream:
            try:
                await self.converse(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def converse(self, stream: trio.SocketStream) -> None:
        self.sessions += 1
        self.open_sessions += 1
        self.most_sessions = max(self.most_sessions, self.open_sessions)
        try:
            await self._session(stream)
        finally:
            self.open_sessions -= 1

    async def _session(self, stream: trio.SocketStream) -> None:
        lines = _Lines(stream)
        await stream.send_all(b"220 " + self.name + b" ESMTP\r\n")
        rcpts: list[str] = []
        while True:
            cmd = await lines.line()
            verb = cmd[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                await stream.send_all(b"250-" + self.name + b"\r\n250 8BITMIME\r\n" if verb == b"EHLO"
                                      else b"250 " + self.name + b"\r\n")
            elif verb == b"MAIL":
                rcpts = []
                await stream.send_all(b"250 2.1.0 Ok\r\n")
            elif verb == b"RCPT":
                if self.rcpt_reply is not None:
                    self.refused_rcpts += 1
                    await stream.send_all(self.rcpt_reply)
                    continue
                rcpts.append(cmd.split(b"<", 1)[1].split(b">", 1)[0].decode())
                await stream.send_all(b"250 2.1.5 Ok\r\n")
            elif verb == b"DATA":
                if not rcpts:
                    await stream.send_all(b"554 5.5.1 no valid recipients\r\n")
                    continue
                if self.drop_at_data:
                    return
                await stream.send_all(b"354 go ahead\r\n")
                while await lines.line() != b".":
                    pass
                if self.delay:
                    await trio.sleep(self.delay)  # a slow site: each message takes this long
                self.delivered.append(rcpts)
                await stream.send_all(b"250 2.0.0 Ok: queued\r\n")
            elif verb == b"QUIT":
                await stream.send_all(b"221 2.0.0 Bye\r\n")
                return
            else:  # RSET, NOOP
                await stream.send_all(b"250 2.0.0 Ok\r\n")


class LimitedPeer(SmtpPeer):
    def __init__(self, max_sessions: int, delay: float = 0.0) -> None:
        super().__init__(delay)
        self.max_sessions = max_sessions
        self.refused = 0  # connections greeted with 421

    async def converse(self, stream: trio.SocketStream) -> None:
        if self.open_sessions >= self.max_sessions:
            self.refused += 1
            await stream.send_all(TOO_MANY)
            return
        await super().converse(stream)


class DeadPeer:
    """Accepts, counts and never greets; the client gives up (``smtp_helo_timeout``)."""

    def __init__(self) -> None:
        self.connections = 0
        self.times: list[float] = []  # trio.current_time() of each connection
        self.closed: list[float] = []  # ... and of each hang-up by the client
        self.received = bytearray()  # whatever the client said to a peer that never greeted

    async def run(self, host: str, port: int = 0, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        self.times.append(trio.current_time())
        async with stream:
            try:
                while data := await stream.receive_some(4096):  # until the client hangs up
                    if len(self.received) < 1 << 16:
                        self.received += data
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            self.closed.append(trio.current_time())
