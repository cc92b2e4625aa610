"""A scriptable SMTP peer (trio) for outbound tests: it says what a test tells it to
(greeting, EHLO name, extensions), counts connections and records every command and
the raw DATA bytes it received, so a test asserts what went out on the wire."""

from __future__ import annotations

import dataclasses
import ssl

import trio


@dataclasses.dataclass
class Received:
    mail: bytes  # the MAIL FROM command line as sent
    rcpts: list[bytes]
    data: bytes  # the DATA bytes as sent, dot-stuffed, without the final ".\r\n"


class ScriptedPeer:
    def __init__(self, *, greeting: bytes = b"220 peer.test ESMTP", ehlo_name: str = "peer.test",
                 extensions: tuple[str, ...] = ("PIPELINING", "8BITMIME", "SMTPUTF8"),
                 mail_reply: bytes = b"250 2.1.0 Ok\r\n", close_after_mail: bool = False,
                 data_done_reply: bytes = b"250 2.0.0 Ok: queued\r\n", tls: ssl.SSLContext | None = None,
                 stray: bytes = b"") -> None:
        self.greeting = greeting
        self.tls = tls  # STARTTLS offered (before it is used) with this server context
        self.stray = stray  # sent 0.1 s after each end of data's reply, out of turn
        self.strays = 0  # ... how many times so far
        self.mail_reply = mail_reply  # what MAIL FROM gets, and whether the peer then hangs up
        self.close_after_mail = close_after_mail
        self.data_done_reply = data_done_reply  # the end of data's reply (a stray one after it too)
        self.ehlo_name = ehlo_name
        self.extensions = extensions
        self.connections = 0
        self.received: list[Received] = []
        self.commands: list[bytes] = []

    async def run(self, host: str = "127.0.0.1", port: int = 0, *,
                  task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, raw: trio.SocketStream) -> None:
        self.connections += 1
        buf = bytearray()
        stream: trio.abc.Stream = raw

        async def line() -> bytes:
            while b"\r\n" not in buf:
                data = await stream.receive_some(65536)
                if not data or len(buf) > 1 << 22:
                    raise trio.BrokenResourceError
                buf.extend(data)
            end = buf.index(b"\r\n")
            out = bytes(buf[:end])
            del buf[:end + 2]
            return out

        async with raw:
            try:
                await stream.send_all(self.greeting + b"\r\n")
                if not self.greeting.startswith(b"220"):
                    return
                mail, rcpts = b"", []
                while True:
                    cmd = await line()
                    self.commands.append(cmd)
                    verb = cmd[:4].upper()
                    if verb == b"EHLO":
                        lines = [self.ehlo_name, *self.extensions, *(["STARTTLS"] if self.tls and stream is raw else [])]
                        reply = b"".join(f"250{'-' if i < len(lines) - 1 else ' '}{text}\r\n".encode()
                                         for i, text in enumerate(lines))
                        await stream.send_all(reply)
                    elif verb == b"MAIL":
                        mail, rcpts = cmd, []
                        await stream.send_all(self.mail_reply)
                        if self.close_after_mail:
                            return
                    elif verb == b"RCPT":
                        rcpts.append(cmd)
                        await stream.send_all(b"250 2.1.5 Ok\r\n")
                    elif verb == b"DATA":
                        await stream.send_all(b"354 go ahead\r\n")
                        data = bytearray()
                        while (text := await line()) != b".":
                            data += text + b"\r\n"
                        self.received.append(Received(mail, rcpts, bytes(data)))
                        await stream.send_all(self.data_done_reply)
                        if self.stray:
                            await trio.sleep(0.1)
                            await stream.send_all(self.stray)
                            self.strays += 1
                    elif verb == b"STAR" and self.tls is not None and stream is raw:
                        await stream.send_all(b"220 2.0.0 Ready to start TLS\r\n")
                        stream = trio.SSLStream(raw, self.tls, server_side=True)
                        await stream.do_handshake()
                    elif verb == b"QUIT":
                        await stream.send_all(b"221 2.0.0 Bye\r\n")
                        return
                    else:
                        await stream.send_all(b"250 2.0.0 Ok\r\n")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
