"""The SMTP delivery agent's session: trio I/O around the client pieces in trimail.smtp.client.

A ``Connection`` is one session with a mail server that ``connector.Connector``
opened.  ``Connection.hello()`` reads the greeting and sends EHLO (HELO as
fallback), with STARTTLS as smtp_tls_security_level asks (``TlsRequired`` when a
host cannot give it, ``TlsFailed`` when the handshake fails).  ``Connection.deliver()``
runs one transaction (pipelined when offered), one ``Outcome`` per recipient;
connection trouble defers every recipient not yet decided.  Mail that needs
SMTPUTF8 bounces ``5.6.7`` at a server without it; 8-bit MIME entities to a server
without 8BITMIME become quoted-printable (``mime``).  To a server that offers DSN,
RET and ENVID go with MAIL FROM and NOTIFY and ORCPT with each RCPT TO (the
``Envelope``'s, from ``delivery.notify``); a success at a server without DSN is
``Relayed`` (a NOTIFY=SUCCESS recipient is told so).  Connections are reused for
several messages.  Every read and write has its stage's timeout (``Timeouts``).

Parameters: smtp_{connect,helo,mail,rcpt,data_init,data_xfer,data_done,quit}_timeout
(``Timeouts.from_config``); disable_mime_output_conversion and the TLS policy are
read by ``connector.Connector`` and set on each connection.

Security notes: replies are parsed bounded; nothing from the server is trusted beyond
reply codes and EHLO keywords; bytes after the 220 to STARTTLS end the connection
(never used as replies after the handshake); with a TLS policy that requires it,
nothing is sent in clear.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable

import trio

from trimail.config import Config
from trimail.delivery.mime import content_needs_smtputf8, downgraded
from trimail.delivery.outcome import Outcome, Relayed, bounced, classify, deferred
from trimail.net.stream import DirectStream
from trimail.net.tls import TlsPolicy, close_within
from trimail.smtp.client import (
    DotStuffer,
    Extensions,
    PeerProtocolError,
    ReplyParser,
    first_word,
    mail_command,
    rcpt_command,
)
from trimail.smtp.replies import Reply

CHUNK = 64 * 1024


@dataclasses.dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 30
    helo: float = 300
    mail: float = 300
    rcpt: float = 300
    data_init: float = 120
    data_xfer: float = 180
    data_done: float = 600
    quit: float = 300

    @classmethod
    def from_config(cls, config: Config) -> Timeouts:
        return cls(*(config.get(f"smtp_{f.name}_timeout") for f in dataclasses.fields(cls)))


class ConnectionLost(Exception):
    """The connection broke or timed out during *stage*."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class TlsRequired(ConnectionLost):
    """The policy demands TLS and this host cannot give it: never send in clear."""


class TlsFailed(ConnectionLost):
    """The TLS handshake failed (with level may, the host is retried in clear)."""


@dataclasses.dataclass(slots=True)
class Envelope:
    sender: str
    recipients: list[str]
    size: int
    eight_bit: bool = False
    smtputf8: bool = False
    dsn_mail: tuple[str, ...] = ()  # RET=, ENVID= (sent to a server that offers DSN)
    dsn_rcpts: tuple[tuple[str, ...], ...] = ()  # NOTIFY=, ORCPT= of each recipient, in order


class Connection:
    def __init__(self, stream: trio.abc.Stream, host: str, address: str, port: int, timeouts: Timeouts) -> None:
        self.stream = stream
        self.host = host
        self.address = address
        self.port = port
        self.timeouts = timeouts
        self.parser = ReplyParser()
        self.ext = Extensions({})
        self.greeting_name = ""  # the first word of the 220 greeting
        self.ehlo_name = ""  # the first word of the EHLO reply: the server's name for itself
        self.usable = True
        self.mime_conversion = True  # not disable_mime_output_conversion
        self.line_limit = 0  # smtp_line_length_limit (0: none)
        self.tls: str | None = None  # "TLSv1.3 with cipher ..." once encrypted

    @property
    def relay(self) -> str:
        """``host[addr]:port``: Postfix's ``relay=`` (its namaddrport)."""
        return f"{self.host}[{self.address}]:{self.port}"

    @property
    def namaddr(self) -> str:
        """``host[addr]``: how Postfix names the server in a reason (``host X said:``,
        ``lost connection with X while ...``), without the port."""
        return f"{self.host}[{self.address}]"

    async def _read(self, timeout: float, stage: str) -> Reply:
        """The next reply, within *timeout* from the first wait for it.  A connection
        that broke, timed out or talked nonsense is never used again, not even for QUIT
        (``ConnectionLost``).  A reply already received (pipelining) costs no wait and
        no cancel scope."""
        deadline = None
        try:
            while (reply := self.parser.next_reply()) is None:
                data = self.stream.receive_now(CHUNK) if isinstance(self.stream, DirectStream) else None
                if data is None:
                    if deadline is None:
                        deadline = trio.current_time() + timeout
                    with trio.fail_at(deadline):
                        data = await self.stream.receive_some(CHUNK)
                if not data:
                    raise self._lost(f"lost connection with {self.namaddr} while {stage}")
                self.parser.feed(data)
        except trio.TooSlowError:
            raise self._lost(f"conversation with {self.namaddr} timed out while {stage}") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            raise self._lost(f"lost connection with {self.namaddr} while {stage}") from None
        except PeerProtocolError as exc:
            raise self._lost(f"bad reply from {self.namaddr} while {stage}: {exc}") from None
        return reply

    async def _send(self, data: bytes, timeout: float, stage: str) -> None:
        """Send *data* within *timeout*; what the kernel takes at once costs no cancel scope."""
        try:
            sent = self.stream.send_now(data) if isinstance(self.stream, DirectStream) else 0
            if sent < len(data):
                with trio.fail_after(timeout):
                    await self.stream.send_all(memoryview(data)[sent:])
        except trio.TooSlowError:
            raise self._lost(f"conversation with {self.namaddr} timed out while {stage}") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            raise self._lost(f"lost connection with {self.namaddr} while {stage}") from None

    def _lost(self, text: str) -> ConnectionLost:
        self.usable = False
        return ConnectionLost(text)

    async def hello(self, helo_name: str, tls: TlsPolicy | None = None) -> Reply:
        greeting = await self._read(self.timeouts.helo, "receiving the initial server greeting")
        self.greeting_name = first_word(greeting)
        if greeting.code != 220:
            return greeting
        reply = await self._ehlo(helo_name)
        if reply.code == 250:
            if tls is not None and tls.level != "none":
                await self._starttls(helo_name, tls)
                if self.tls:
                    reply = await self._ehlo(helo_name)
                    if reply.code != 250:
                        raise ConnectionLost(f"{self.namaddr} refused EHLO after STARTTLS: {reply}")
            return reply
        if tls is not None and tls.required:
            raise TlsRequired(f"TLS is required, but host {self.namaddr} refused EHLO")
        return await self.command(f"HELO {helo_name}\r\n".encode(), self.timeouts.helo, "HELO")

    async def _ehlo(self, helo_name: str) -> Reply:
        reply = await self.command(f"EHLO {helo_name}\r\n".encode(), self.timeouts.helo, "EHLO")
        self.ext = Extensions.from_ehlo(reply) if reply.code == 250 else Extensions({})
        self.ehlo_name = first_word(reply) if reply.code == 250 else ""
        return reply

    async def _starttls(self, helo_name: str, tls: TlsPolicy) -> None:
        if not self.ext.has("STARTTLS"):
            if tls.required:
                raise TlsRequired(f"TLS is required, but was not offered by host {self.namaddr}")
            return
        reply = await self.command(b"STARTTLS\r\n", self.timeouts.helo, "STARTTLS")
        if reply.code != 220:
            if tls.required:
                raise TlsRequired(f"TLS is required, but host {self.namaddr} refused STARTTLS: {reply}")
            return
        if self.parser.pending:
            # bytes after the 220 were sent before the handshake: an injection attempt
            # (the CVE-2011-0411 class, seen from the client side); never use them
            self.usable = False
            raise ConnectionLost(f"host {self.namaddr} sent unexpected data after the STARTTLS reply")
        stream = trio.SSLStream(self.stream, tls.context(), server_hostname=self.host,
                                https_compatible=False)
        try:
            with trio.fail_after(self.timeouts.helo):
                await stream.do_handshake()
        except (trio.TooSlowError, trio.BrokenResourceError, OSError) as exc:
            self.usable = False
            raise TlsFailed(f"TLS handshake with {self.namaddr} failed: {exc}") from None
        self.stream = stream
        self.tls = f"{stream.version()} with cipher {stream.cipher()[0]}"

    async def deliver(self, envelope: Envelope, content: Callable[[], AsyncIterator[bytes]]) -> list[Outcome]:
        """One mail transaction; an Outcome per recipient, in order."""
        count = len(envelope.recipients)
        limit = self.ext.size_limit
        if limit is not None and envelope.size > limit:
            outcome = bounced("5.3.4", f"message size {envelope.size} exceeds size limit {limit} of server "
                              f"{self.namaddr}")
            return [outcome] * count
        utf8_needed = False
        if envelope.smtputf8 and not (self.ext.has("SMTPUTF8") and self.ext.has("8BITMIME")):
            utf8_needed = await content_needs_smtputf8(envelope.sender, envelope.recipients, content)
        if utf8_needed and not self.ext.has("SMTPUTF8"):
            # RFC 6531 section 3.2: no downgrade; Postfix's words and status
            outcome = bounced("5.6.7", "message requires SMTPUTF8, but no server was found that supports "
                              f"SMTPUTF8. The last attempted server was {self.namaddr}")
            return [outcome] * count
        # 8-bit entities to a server without 8BITMIME become quoted-printable (never for
        # mail that needs SMTPUTF8); SIZE is not announced then, the size changes
        convert = self.mime_conversion and not self.ext.has("8BITMIME") and not utf8_needed
        try:
            return await self._transaction(envelope, downgraded(content) if convert else content,
                                           None if convert else envelope.size)
        except ConnectionLost as exc:
            self.usable = False
            return [deferred("4.4.2", exc.text)] * count

    async def _transaction(self, envelope: Envelope, content: Callable[[], AsyncIterator[bytes]],
                           size: int | None) -> list[Outcome]:
        t = self.timeouts
        mail = mail_command(envelope.sender, size, self.ext, eight_bit=envelope.eight_bit,
                            smtputf8=envelope.smtputf8, dsn=envelope.dsn_mail)
        dsn = envelope.dsn_rcpts or ((),) * len(envelope.recipients)
        rcpts = [rcpt_command(r, d, self.ext) for r, d in zip(envelope.recipients, dsn, strict=True)]
        if self.ext.has("PIPELINING"):
            await self._send(mail + b"".join(rcpts) + b"DATA\r\n", t.mail, "sending MAIL FROM")
            mail_reply = await self._read(t.mail, "receiving the MAIL FROM reply")
            rcpt_replies = []
            try:
                while len(rcpt_replies) < len(rcpts):
                    rcpt_replies.append(await self._read(t.rcpt, "receiving the RCPT TO reply"))
                data_reply = await self._read(t.data_init, "receiving the DATA reply")
            except ConnectionLost as exc:  # a refusal and then a close: the refusal is the answer
                return self._refused_then_lost(mail_reply, rcpt_replies, len(rcpts), exc)
        else:
            await self._send(mail, t.mail, "sending MAIL FROM")
            mail_reply = await self._read(t.mail, "receiving the MAIL FROM reply")
            rcpt_replies = []
            data_reply = None
            if mail_reply.code == 250:
                for command in rcpts:
                    await self._send(command, t.rcpt, "sending RCPT TO")
                    rcpt_replies.append(await self._read(t.rcpt, "receiving the RCPT TO reply"))
                if any(r.code in (250, 251) for r in rcpt_replies):
                    await self._send(b"DATA\r\n", t.data_init, "sending DATA")
                    data_reply = await self._read(t.data_init, "receiving the DATA reply")
        if mail_reply.code != 250:
            await self._reset()
            return [classify(mail_reply, self.namaddr, "MAIL FROM")] * len(rcpts)
        outcomes: list[Outcome | None] = [
            None if r.code in (250, 251) else classify(r, self.namaddr, "RCPT TO") for r in rcpt_replies]
        if all(o is not None for o in outcomes):
            if data_reply is not None and data_reply.code == 354:  # a broken server: end the empty message
                await self._send(b".\r\n", t.data_done, "sending end of data")
                await self._read(t.data_done, "receiving the end of data reply")
            await self._reset()
            return [o for o in outcomes if o is not None]
        assert data_reply is not None
        if data_reply.code != 354:
            await self._reset()
            final = classify(data_reply, self.namaddr, "DATA")
            return [o if o is not None else final for o in outcomes]
        stuffer = DotStuffer(self.line_limit)
        pending = b""  # the last piece goes out with the end of data, in one send
        async for chunk in content():  # streamed: memory does not grow with message size
            if pending:
                await self._send(pending, t.data_xfer, "sending message body")
            pending = stuffer.stuff(chunk)
        await self._send(pending + stuffer.finish(), t.data_xfer, "sending message body")
        final_reply = await self._read(t.data_done, "receiving the end of data reply")
        final = classify(final_reply, self.namaddr, "end of DATA")
        if final.status == "sent" and not self.ext.has("DSN"):  # NOTIFY=SUCCESS is ours to answer
            final = Relayed(final.status, final.dsn, final.text)
        return [o if o is not None else final for o in outcomes]

    def _refused_then_lost(self, mail_reply: Reply, rcpt_replies: list[Reply], count: int,
                           lost: ConnectionLost) -> list[Outcome]:
        """A pipelined transaction whose connection broke after some replies: a refused
        MAIL FROM answers for every recipient, a refused RCPT TO for its own; the rest
        are deferred with the loss (red team 33a: a 554 and a close was deferred 4.4.2,
        and retried for the whole queue lifetime instead of bounced)."""
        if mail_reply.code != 250:
            return [classify(mail_reply, self.namaddr, "MAIL FROM")] * count
        failure = deferred("4.4.2", lost.text)
        return [classify(reply, self.namaddr, "RCPT TO") if reply.code not in (250, 251) else failure
                for reply in rcpt_replies] + [failure] * (count - len(rcpt_replies))

    def desynchronized(self) -> bool:
        """Has the server sent anything since its last reply (a stray reply, or the end
        of the connection)?  Then the connection is not used again: the next
        transaction would take those bytes for its own replies (red team 33a: a stray
        550 after a 250 bounced the next message).  On TLS (red team 33c) the records
        TLS holds undecrypted and the socket under it are looked at without reading,
        since a TLS read cannot be cancelled safely."""
        if self.parser.pending:
            return True
        stream = self.stream
        if isinstance(stream, trio.SSLStream):
            ssl_object, incoming = getattr(stream, "_ssl_object", None), getattr(stream, "_incoming", None)
            if (ssl_object is not None and ssl_object.pending()) or (incoming is not None and incoming.pending):
                return True
            stream = stream.transport_stream
        if not isinstance(stream, DirectStream):
            return False
        if stream is not self.stream:  # (bytes of TLS records: look, do not take)
            return stream.waiting()
        try:
            return stream.receive_now(CHUNK) is not None  # (b"": the server closed)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return True

    async def command(self, line: bytes, timeout: float, what: str) -> Reply:
        """Send one command line and read its reply, each within *timeout*
        (ConnectionLost when the connection breaks, times out or talks nonsense)."""
        await self._send(line, timeout, f"sending {what}")
        return await self._read(timeout, f"receiving the {what} reply")

    async def _reset(self) -> None:
        """RSET after a refusal, which stays the answer: a server that closed instead
        only makes the connection unusable (``_lost``)."""
        try:
            reply = await self.command(b"RSET\r\n", self.timeouts.mail, "RSET")
        except ConnectionLost:
            return
        if reply.code != 250:
            self.usable = False

    async def close(self) -> None:
        if self.usable:
            with trio.move_on_after(min(self.timeouts.quit, 5)):
                try:
                    await self.command(b"QUIT\r\n", self.timeouts.quit, "QUIT")
                except ConnectionLost:
                    pass
        await close_within(self.stream)
