"""The SMTP delivery agent: trio I/O around the client pieces in trimail.smtp.client.

``Connector.open()`` tries the addresses ``mx.Targets`` gives (MX or ``[host]``, at
most smtp_mx_address_limit, cut at our own preference) until one greets with ``220``
and accepts EHLO (HELO as fallback): that session carries the attempt.  Towards
port 25, an EHLO reply naming $myhostname is a loop: ``5.4.6 mail for X loops back
to myself`` (``4.4.6`` below the best MX).  ``Connection.deliver()`` runs one
transaction (pipelined when offered), one ``Outcome`` per recipient; connection
trouble defers every recipient not yet decided.  ``attempt.deliver()`` moves the
recipients a session leaves soft-failed on to the next mail host (``open(skip=)``).  Mail that needs SMTPUTF8 bounces
``5.6.7`` at a server without it; 8-bit MIME entities to a server without 8BITMIME
become quoted-printable (``mime``).  Connections are reused for several messages.

Parameters: smtp_{connect,helo,mail,rcpt,data_init,data_xfer,data_done,quit}_timeout,
myhostname, smtp_mx_address_limit, smtp_mx_session_limit,
proxy_interfaces, disable_mime_output_conversion, smtp_tls_security_level, smtp_tls_CAfile.

Security notes: replies are parsed bounded; nothing from the server is trusted beyond
reply codes and EHLO keywords; one attempt's fan-out (connections, lookups) is bounded.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
from collections.abc import AsyncIterator, Callable

import trio

from trimail.config import Config
from trimail.config.values import ListenAddress
from trimail.delivery.interfaces import OwnAddresses
from trimail.delivery.mime import content_needs_smtputf8, downgraded
from trimail.delivery.mx import Targets, dns_outcome
from trimail.delivery.outcome import Outcome, bounced, classify, deferred
from trimail.delivery.route import DEFAULT_PORT, Route
from trimail.net.dns import DnsError, MailHost, Resolver
from trimail.net.stream import DirectStream
from trimail.net.tls import TlsPolicy
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

log = logging.getLogger("trimail.smtp")

CHUNK = 64 * 1024


def connect_error(exc: OSError) -> str:
    """A failed connect's errno text as Postfix writes it (``Connection refused``):
    trio's open_tcp_stream raises one OSError ("all attempts to connect ... failed")
    whose cause holds each attempt's error."""
    attempts = getattr(exc.__cause__, "exceptions", None) or [exc]
    for attempt in attempts:
        if isinstance(attempt, OSError) and attempt.errno:
            return os.strerror(attempt.errno)
    return exc.strerror or str(exc)


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


class ConnectionFailed(Exception):
    """No host of the destination could be used; ``outcome`` applies to everyone queued."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.text)
        self.outcome = outcome


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
                            smtputf8=envelope.smtputf8)
        rcpts = [rcpt_command(r) for r in envelope.recipients]
        if self.ext.has("PIPELINING"):
            await self._send(mail + b"".join(rcpts) + b"DATA\r\n", t.mail, "sending MAIL FROM")
            mail_reply = await self._read(t.mail, "receiving the MAIL FROM reply")
            rcpt_replies = [await self._read(t.rcpt, "receiving the RCPT TO reply") for _ in rcpts]
            data_reply = await self._read(t.data_init, "receiving the DATA reply")
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
        stuffer = DotStuffer()
        pending = b""  # the last piece goes out with the end of data, in one send
        async for chunk in content():  # streamed: memory does not grow with message size
            if pending:
                await self._send(pending, t.data_xfer, "sending message body")
            pending = stuffer.stuff(chunk)
        await self._send(pending + stuffer.finish(), t.data_xfer, "sending message body")
        final_reply = await self._read(t.data_done, "receiving the end of data reply")
        final = classify(final_reply, self.namaddr, "end of DATA")
        return [o if o is not None else final for o in outcomes]

    async def command(self, line: bytes, timeout: float, what: str) -> Reply:
        """Send one command line and read its reply, each within *timeout*
        (ConnectionLost when the connection breaks, times out or talks nonsense)."""
        await self._send(line, timeout, f"sending {what}")
        return await self._read(timeout, f"receiving the {what} reply")

    async def _reset(self) -> None:
        reply = await self.command(b"RSET\r\n", self.timeouts.mail, "RSET")
        if reply.code != 250:
            self.usable = False

    async def close(self) -> None:
        if self.usable:
            with trio.move_on_after(min(self.timeouts.quit, 5)):
                try:
                    await self.command(b"QUIT\r\n", self.timeouts.quit, "QUIT")
                except ConnectionLost:
                    pass
        with trio.CancelScope(shield=True):
            await self.stream.aclose()


def _is_literal(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


class Connector:
    """Opens connections for routes: DNS, MX selection and loop detection (mx.Targets),
    greeting and EHLO (with the EHLO name loop check)."""

    def __init__(self, config: Config, resolver: Resolver,
                 own_addresses: list[ListenAddress] | Callable[[], list[ListenAddress]],
                 interfaces: OwnAddresses | None = None) -> None:
        self.resolver = resolver
        self.own = own_addresses
        self.interfaces = interfaces or OwnAddresses()
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        """Settings for connections opened from now on (a reload)."""
        self.helo_name: str = config.myhostname
        self.timeouts = Timeouts.from_config(config)
        self.proxies = frozenset(ipaddress.ip_address(a) for a in config.proxy_interfaces)
        self.address_limit: int = config.smtp_mx_address_limit
        self.session_limit: int = config.smtp_mx_session_limit
        self.mime_conversion = not config.disable_mime_output_conversion
        self.tls = TlsPolicy(config.smtp_tls_security_level or "none", config.smtp_tls_CAfile)

    def _is_self(self, address: str, port: int) -> bool:
        """Would a connection to *address*:*port* reach this MTA?  Yes if it is one of our
        listeners (a wildcard listener counts for every address of the host), or a
        proxy_interfaces address on port 25 (Postfix's smtp_find_self)."""
        ip = ipaddress.ip_address(address)
        if port == DEFAULT_PORT and ip in self.proxies:
            return True
        for own in self.own() if callable(self.own) else self.own:  # a callable follows reloads
            if own.port != port:
                continue
            own_ip = ipaddress.ip_address(own.host)
            if own_ip == ip or (own_ip.is_unspecified and self.interfaces.is_mine(ip)):
                return True
        return False

    async def open(self, route: Route, *, skip: frozenset[str] = frozenset()) -> Connection:
        """A session with the first mail host of *route* that greets and accepts EHLO
        (never one of the addresses in *skip*); ConnectionFailed with the reason
        when there is none."""
        try:
            hosts = await self.resolver.mx_hosts(route.nexthop) if route.mx else [MailHost(route.nexthop, 0)]
        except DnsError as exc:
            raise ConnectionFailed(dns_outcome(exc)) from None
        # Postfix looks for loops only towards port 25: a content filter on another port
        # of this host is no loop.  Our own listeners are known exactly and always count.
        loop_detect = route.port == DEFAULT_PORT
        targets = Targets(self.resolver, route.nexthop, hosts, address_limit=self.address_limit,
                          is_self=lambda address: self._is_self(address, route.port), skip=skip)
        last: Outcome | None = None
        async for target in targets:
            conn, outcome = await self._try(target.host, target.address, route.port)
            if conn is not None and loop_detect and conn.ehlo_name.lower() == self.helo_name.lower():
                log.warning("host %s replied to HELO/EHLO with my own hostname %s", conn.relay, self.helo_name)
                conn.usable = False
                await conn.close()
                text = f"mail for {route.nexthop} loops back to myself"
                if target.best:
                    raise ConnectionFailed(bounced("5.4.6", text))
                conn, outcome = None, deferred("4.4.6", text)
            if conn is not None:
                if loop_detect and conn.greeting_name.lower() == self.helo_name.lower():
                    log.warning("host %s greeted me with my own hostname %s", conn.relay, self.helo_name)
                return conn
            last = outcome
        failure = targets.failure if targets.loop or last is None else last
        raise ConnectionFailed(failure or deferred("4.4.1", f"no mail host for {route.nexthop}"))

    async def _try(self, host: str, address: str, port: int,
                   tls: bool = True) -> tuple[Connection | None, Outcome | None]:
        relay = f"{host}[{address}]:{port}"
        try:
            with trio.fail_after(self.timeouts.connect):
                stream: trio.abc.Stream = await DirectStream.connect(address, port) if _is_literal(address) \
                    else await trio.open_tcp_stream(address, port)
        except trio.TooSlowError:
            return None, deferred("4.4.1", f"connect to {relay}: Connection timed out")
        except OSError as exc:
            return None, deferred("4.4.1", f"connect to {relay}: {connect_error(exc)}")
        conn = Connection(stream, host, address, port, self.timeouts)
        conn.mime_conversion = self.mime_conversion
        try:
            reply = await conn.hello(self.helo_name, self.tls if tls else None)
        except TlsRequired as exc:
            await conn.close()
            return None, deferred("4.7.4", exc.text)
        except TlsFailed as exc:
            await conn.close()
            if self.tls.required:
                return None, deferred("4.7.5", exc.text)
            log.info("%s; trying again in clear (smtp_tls_security_level = may)", exc.text)
            return await self._try(host, address, port, tls=False)
        except ConnectionLost as exc:
            await conn.close()
            return None, deferred("4.4.2", exc.text)
        if reply.code != 250:
            conn.usable = reply.code not in (421,)
            await conn.close()
            stage = "the initial greeting" if reply.code != 250 else "EHLO"
            outcome = classify(reply, relay, stage)
            # a refusing host is skipped in favour of the next one, and never bounces mail by itself
            return None, deferred("4.4.2" if outcome.status == "bounced" else outcome.dsn,
                                  f"host {relay} refused to talk to me: {reply.code} {' '.join(reply.lines())}")
        if conn.tls:
            log.info("Anonymous TLS connection established to %s: %s", relay, conn.tls)
        return conn, None
