"""Real SMTP peers for delivery tests: aiosmtpd sinks and small trio servers that misbehave."""

from __future__ import annotations

import threading

import trio
from aiosmtpd.controller import Controller

from tests.ports import free_port as _free_port


class Recorder:
    """aiosmtpd handler: records messages; ``rules`` maps a local part to a reply."""

    def __init__(self, rules: dict[str, str] | None = None, delay: float = 0.0,
                 gate: threading.Event | None = None, commit_first: bool = False) -> None:
        self.rules = rules or {}
        self.delay = delay
        self.gate = gate  # when given: DATA is answered only once it is set (a peer held by the test)
        self.commit_first = commit_first  # an MTA's way: the message is kept before the reply is sent
        self.tls_used: list[bool] = []
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.lock = threading.Lock()
        self.in_flight = 0  # DATA being handled right now, and the most there ever were
        self.most_in_flight = 0

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        rule = self.rules.get(address.split("@")[0])
        if rule:
            return rule
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        self.tls_used.append(session.ssl is not None)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        if self.commit_first:  # kept now, even if the client has gone by the time the reply is sent
            self._keep(envelope)
        if self.delay:
            import asyncio

            await asyncio.sleep(self.delay)  # a slow peer, so deliveries are in flight
        if self.gate is not None:
            import asyncio

            while not self.gate.is_set():  # held until the test releases it, however slow the machine
                await asyncio.sleep(0.01)
        self.in_flight -= 1
        if not self.commit_first:
            self._keep(envelope)
        return "250 2.0.0 Ok: queued as SINK"

    def _keep(self, envelope) -> None:
        with self.lock:
            self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))

    def recipients(self) -> list[str]:
        with self.lock:
            return [r for _, rcpts, _ in self.messages for r in rcpts]


class Sink:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, rules: dict[str, str] | None = None,
                 delay: float = 0.0, tls_context=None, size_limit: int | None = None, held: bool = False,
                 commit_first: bool = False) -> None:
        # held: DATA is answered only after release() (deliveries stay in flight until the test says)
        self.gate = threading.Event() if held else None
        self.recorder = Recorder(rules, delay, self.gate, commit_first)
        extra = {"tls_context": tls_context} if tls_context is not None else {}
        if size_limit is not None:
            extra["data_size_limit"] = size_limit
        self.controller = Controller(self.recorder, hostname=host, port=port or _free_port(host),
                                     server_hostname="sink.test", ready_timeout=10, **extra)
        self.host = host
        self.port = self.controller.port

    def __enter__(self) -> Sink:
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
        self.controller.stop()

    def release(self) -> None:
        """A held sink answers the DATA it holds, and every one after, at once."""
        if self.gate is not None:
            self.gate.set()

    @property
    def messages(self):
        return self.recorder.messages


async def silent_server(host: str = "127.0.0.1", *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Accepts connections and never says a word (a hung peer, for timeouts)."""
    listeners = await trio.open_tcp_listeners(0, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(lambda stream: trio.sleep_forever(), listeners)


async def greeting_only_server(reply: bytes, host: str = "127.0.0.1", *,
                               task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Answers every connection with *reply* (e.g. a 421 greeting) and closes."""
    listeners = await trio.open_tcp_listeners(0, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(reply)

    await trio.serve_listeners(handle, listeners)


class DroppingServer:
    """A minimal SMTP server that drops the connection in the middle of DATA while
    ``drop`` is set, and accepts mail normally otherwise."""

    def __init__(self, drop: bool = True, ehlo: bool = True) -> None:
        self.drop = drop
        self.ehlo = ehlo
        self.helo_seen: list[bytes] = []
        self.delivered: list[list[str]] = []
        self.connections = 0
        self.open_now = 0  # connections not yet closed

    async def run(self, host: str = "127.0.0.1", *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=host)
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self.handle, listeners)

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        self.open_now += 1
        try:
            await self._converse(stream)
        finally:
            self.open_now -= 1

    async def _converse(self, stream: trio.SocketStream) -> None:
        buf = b""

        async def line() -> bytes:
            nonlocal buf
            while b"\r\n" not in buf:
                data = await stream.receive_some(4096)
                if not data:
                    raise trio.BrokenResourceError
                buf += data
            out, buf = buf.split(b"\r\n", 1)
            return out

        async with stream:
            try:
                await stream.send_all(b"220 dropper ESMTP\r\n")
                rcpts: list[str] = []
                while True:
                    cmd = await line()
                    verb = cmd[:4].upper()
                    if verb == b"EHLO" and not self.ehlo:
                        await stream.send_all(b"502 5.5.1 EHLO not implemented\r\n")
                    elif verb in (b"EHLO", b"HELO"):
                        self.helo_seen.append(verb)
                        await stream.send_all(b"250-dropper\r\n250 8BITMIME\r\n" if verb == b"EHLO"
                                              else b"250 dropper\r\n")
                    elif verb == b"MAIL":
                        rcpts = []
                        await stream.send_all(b"250 2.1.0 ok\r\n")
                    elif verb == b"RCPT":
                        rcpts.append(cmd.split(b"<")[1].split(b">")[0].decode())
                        await stream.send_all(b"250 2.1.5 ok\r\n")
                    elif verb == b"DATA":
                        await stream.send_all(b"354 go\r\n")
                        if self.drop:
                            await line()  # read a little content, then vanish
                            return
                        while await line() != b".":
                            pass
                        self.delivered.append(rcpts)
                        await stream.send_all(b"250 2.0.0 ok\r\n")
                    elif verb == b"QUIT":
                        await stream.send_all(b"221 bye\r\n")
                        return
                    else:
                        await stream.send_all(b"250 ok\r\n")
            except trio.BrokenResourceError:
                return
