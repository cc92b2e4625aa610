"""The trio side of one milter connection: connect (``inet:host:port`` or
``unix:/path``), negotiate, send an event and read the filter's answers, each read
with its deadline.  Everything the filter can do wrong -- refuse the connection,
say nothing until the deadline, close, send a malformed or unexpected frame --
comes out as ``MilterError`` with the text Postfix logs after ``milter NAME:``.

The modifications a filter sends before its decision at the end of a message are
held until the decision comes (a replaced body too): at most ``MAX_EDITS`` of them
and ``edit_limit`` bytes (message_size_limit + header_size_limit + 1 MiB, each
modification charged ``EDIT_OVERHEAD`` more); a filter that sends more has failed
("too many modifications").  Without the bound a filter streaming SMFIR_REPLBODY
grew the daemon by all it sent, until the OOM killer ended it.

Parameters (through the caller): milter_connect_timeout, milter_command_timeout,
milter_content_timeout, milter_protocol, message_size_limit, header_size_limit.
"""

from __future__ import annotations

import errno
import os
import socket

import trio

from trimail.milter import protocol as p
from trimail.milter.machine import Conversation, parse_endpoint
from trimail.milter.protocol import (
    Decision,
    FrameReader,
    MilterProtocolError,
    Modification,
    parse_response,
)

RECEIVE_SIZE = 65536
MAX_EDITS = 1000  # modification replies one filter may send for one message
EDIT_OVERHEAD = 256  # bytes charged per modification besides its data (the objects holding it)
DEFAULT_EDIT_LIMIT = 64 << 20  # bytes of modifications per message when message_size_limit is 0


class MilterError(Exception):
    """The filter failed; the text is what follows ``milter NAME: `` in the log."""


def _strerror(exc: BaseException) -> str:
    """The system's text for *exc*, looking through trio's "all attempts to connect
    failed" to the first attempt's error."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno:
            return os.strerror(cause.errno)
        if isinstance(cause, BaseExceptionGroup) and cause.exceptions:
            cause = cause.exceptions[0]
        else:
            cause = cause.__cause__
    return str(exc) or type(exc).__name__


class MilterClient:
    """One connection to one filter for one SMTP session."""

    def __init__(self, name: str, protocol: str, *, connect_timeout: float, command_timeout: float,
                 content_timeout: float, edit_limit: int = DEFAULT_EDIT_LIMIT) -> None:
        self.name = name
        self.edit_limit = edit_limit
        self.conversation = Conversation(protocol)
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.content_timeout = content_timeout
        self._stream: trio.SocketStream | None = None
        self._reader = FrameReader()
        self._quickack = False

    async def open(self) -> None:
        """Connect and negotiate; MilterError (Postfix: "connect to Milter service
        NAME: ...", then the handshake's errors)."""
        transport, host, port = parse_endpoint(self.name)
        try:
            with trio.fail_after(self.connect_timeout):
                if transport == "unix":
                    self._stream = await trio.open_unix_socket(host)
                else:
                    self._stream = await trio.open_tcp_stream(host, port)
        except trio.TooSlowError:
            raise MilterError(f"connect to Milter service {self.name}: "
                              f"{os.strerror(errno.ETIMEDOUT)}") from None
        except OSError as exc:
            raise MilterError(f"connect to Milter service {self.name}: {_strerror(exc)}") from None
        if transport == "inet":
            # our commands go at once; and libmilter writes its edits and its decision
            # as separate small segments with Nagle on: the second waits for our ACK,
            # which delayed ACK holds back 40 ms per message unless we ACK at once
            self._stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
            self._quickack = hasattr(socket, "TCP_QUICKACK")
        await self._send(self.conversation.open(), "SMFIC_OPTNEG")
        command, data = await self._frame("SMFIC_OPTNEG", self.command_timeout)
        if command != p.SMFIC_OPTNEG:
            raise MilterError(f'unexpected reply "{command.decode("latin-1")}" in initial handshake')
        try:
            self.conversation.negotiated(parse_response(command, data))
        except MilterProtocolError as exc:
            raise MilterError(str(exc)) from None

    async def event(self, event: str, payload: bytes, macros: list[tuple[str, str]],
                    edits: list[Modification] | None = None) -> Decision | None:
        """Send *event*; the filter's decision, or None when it sends no reply.
        Modifications before the decision (end of message) go into *edits*."""
        data, reply = self.conversation.event(event, payload, macros)
        name = "SMFIC_" + {"eom": "BODYEOB", "rcpt": "RCPT", "helo": "HELO"}.get(event, event.upper())
        if data:
            await self._send(data, name)
        if not reply:
            return None
        timeout = self.content_timeout if event in ("header", "eoh", "body", "eom") else self.command_timeout
        held = 0  # bytes of modifications held for this event
        while True:
            command, frame_data = await self._frame(name, timeout)
            try:
                answer = self.conversation.check(event, parse_response(command, frame_data))
            except MilterProtocolError as exc:
                raise MilterError(str(exc)) from None
            if isinstance(answer, Modification):
                if edits is not None:
                    held += len(frame_data) + EDIT_OVERHEAD
                    if len(edits) >= MAX_EDITS or held > self.edit_limit:
                        raise MilterError(f"too many modifications at {name}: over {MAX_EDITS} or "
                                          f"{self.edit_limit} bytes")
                    edits.append(answer)
            elif answer is not None:
                return answer

    async def send(self, data: bytes) -> None:
        """A command without a reply (SMFIC_ABORT)."""
        await self._send(data, "command")

    async def _send(self, data: bytes, what: str) -> None:
        assert self._stream is not None
        try:
            with trio.fail_after(self.command_timeout):
                await self._stream.send_all(data)
        except trio.TooSlowError:
            raise MilterError(f"error writing {what}: {os.strerror(errno.ETIMEDOUT)}") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            cause = exc.__cause__ or exc
            raise MilterError(f"error writing {what}: {_strerror(cause)}") from None

    async def _frame(self, what: str, timeout: float) -> tuple[bytes, bytes]:
        assert self._stream is not None
        try:
            with trio.fail_after(timeout):
                while (got := self._reader.next_frame()) is None:
                    if self._quickack:  # see open(): ACK the filter's first segment at once
                        self._stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, True)
                    data = await self._stream.receive_some(RECEIVE_SIZE)
                    if not data:
                        raise MilterError(f"can't read {what} reply packet header: "
                                          + ("Unexpected end of data" if self._reader.buffered
                                             else "Connection closed by filter"))
                    self._reader.receive_data(data)
        except trio.TooSlowError:
            raise MilterError(f"can't read {what} reply packet header: "
                              f"{os.strerror(errno.ETIMEDOUT)}") from None
        except MilterProtocolError as exc:
            raise MilterError(str(exc)) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            cause = exc.__cause__ or exc
            raise MilterError(f"can't read {what} reply packet header: {_strerror(cause)}") from None
        return got

    def close(self, quit: bool = True) -> None:
        """Say SMFIC_QUIT if the socket takes it at once, and close (no waiting:
        this runs when the SMTP session ends, in any state)."""
        stream, self._stream = self._stream, None
        if stream is None:
            return
        sock = socket.socket(fileno=stream.socket.detach())
        try:
            if quit:
                sock.send(p.frame(p.SMFIC_QUIT), socket.MSG_DONTWAIT)
        except OSError:
            pass
        finally:
            sock.close()
