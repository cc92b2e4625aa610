"""verify.probe closes its connection on every path after connect: a peer that
sends garbage, a recipient the SMTP client refuses to format (ValueError from
rcpt_command), a probe cancelled mid-dialogue.  A real trio peer on loopback that
records whether its client closed the connection."""

from __future__ import annotations

import pytest
import trio

from trimail.net.dns import Resolver
from trimail.policy.verify import Verifier


class Peer:
    """Greets, answers EHLO and MAIL, then does *after_mail*; sets *closed* at EOF."""

    def __init__(self, after_mail: bytes | None) -> None:
        self.after_mail = after_mail  # None: never answer again
        self.closed = trio.Event()
        self.port = 0

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self.session, listeners)

    async def session(self, stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(b"220 peer.example ESMTP\r\n")
            buffer = b""
            try:
                while True:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        break
                    buffer += chunk
                    while b"\r\n" in buffer:
                        line, buffer = buffer.split(b"\r\n", 1)
                        verb = line[:4].upper()
                        if verb == b"EHLO":
                            await stream.send_all(b"250-peer.example\r\n250 PIPELINING\r\n")
                        elif verb == b"MAIL":
                            await stream.send_all(b"250 2.1.0 Ok\r\n")
                            if self.after_mail is not None:
                                await stream.send_all(self.after_mail)
                        elif verb == b"QUIT":
                            await stream.send_all(b"221 2.0.0 Bye\r\n")
                        elif self.after_mail is not None:
                            await stream.send_all(b"250 2.0.0 Ok\r\n")
            except trio.BrokenResourceError:
                pass
            self.closed.set()


async def _verifier(make_config, nursery, after_mail: bytes | None) -> tuple[Verifier, Peer]:
    peer = Peer(after_mail)
    await nursery.start(peer.run)
    config = make_config(relayhost=f"[127.0.0.1]:{peer.port}", smtp_rcpt_timeout="30s")
    return Verifier(config, Resolver([])), peer


async def test_garbage_after_mail_closes_the_connection(make_config, nursery):
    verifier, peer = await _verifier(make_config, nursery, b"\x00\xff garbage \x1b[2J\r\n")
    answer = await verifier.probe("someone@remote.example")
    assert answer.status == "defer" and "failed" in answer.why
    with trio.fail_after(5):
        await peer.closed.wait()


async def test_a_command_the_client_refuses_to_format_closes_the_connection(make_config, nursery):
    """mail_command/rcpt_command raise ValueError for a control character (the
    resolver keeps those out of recipients; here the sender carries one)."""
    verifier, peer = await _verifier(make_config, nursery, b"")
    verifier.sender = "bad\x01sender@gw.example"
    with pytest.raises(ValueError) as raised:  # held, with its frames: nothing is garbage-collected under us
        await verifier.probe("someone@remote.example")
    with trio.fail_after(5):
        await peer.closed.wait()
    assert raised.value is not None


async def test_a_cancelled_probe_closes_the_connection(make_config, nursery):
    verifier, peer = await _verifier(make_config, nursery, None)  # RCPT is never answered
    held: list[BaseException] = []  # the Cancelled, with its frames: the connection stays referenced
    with trio.move_on_after(0.5) as scope:
        try:
            await verifier.probe("someone@remote.example")
        except trio.Cancelled as exc:
            held.append(exc)
            raise
    assert scope.cancelled_caught and held
    with trio.fail_after(5):
        await peer.closed.wait()
