"""Opening the SMTP delivery agent's connections: from a route to a session that greeted.

``Connector.open()`` tries the addresses ``mx.Targets`` gives (MX or ``[host]``, at
most smtp_mx_address_limit, cut at our own preference; ``Connector.lookup()`` makes
the lookups before the first connection on their own) until one greets with ``220``
and accepts EHLO (HELO as fallback): that session (``smtp.Connection``) carries the
attempt; without one, ``ConnectionFailed`` carries the reason for every recipient.
Towards port 25, an EHLO reply naming $myhostname is a loop: ``5.4.6 mail for X loops
back to myself`` (``4.4.6`` below the best MX); a greeting naming it is only logged.
A TLS handshake that fails at smtp_tls_security_level = may is tried again in clear;
a host that refuses to talk is skipped for the next one and never bounces mail by
itself.  ``attempt.deliver()`` moves the recipients a session leaves soft-failed on to
the next mail host (``open(skip=)``, within smtp_mx_session_limit).

Parameters: smtp_connect_timeout (and the other smtp_*_timeout, for the sessions it
opens: ``smtp.Timeouts``), myhostname, smtp_mx_address_limit, smtp_mx_session_limit,
proxy_interfaces, disable_mime_output_conversion, smtp_line_length_limit, smtp_tls_security_level, smtp_tls_CAfile,
dns_nameservers and dns_concurrency_limit (a reload that changes them: a new resolver).

Security notes: one attempt's fan-out (connections, lookups) is bounded
(smtp_mx_address_limit, ``mx.Targets``); an address of our own (a listener, an
interface of a wildcard listener, proxy_interfaces on port 25) is never connected to.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Callable

import trio

from trimail.config import Config
from trimail.config.values import ListenAddress
from trimail.delivery.interfaces import OwnAddresses
from trimail.delivery.mx import Targets, dns_outcome
from trimail.delivery.outcome import REPLY_TEXT_LIMIT, Outcome, bounced, classify, deferred
from trimail.delivery.route import DEFAULT_PORT, Route
from trimail.delivery.smtp import Connection, ConnectionLost, Timeouts, TlsFailed, TlsRequired
from trimail.log import printable
from trimail.net.dns import DnsError, MailHost, Resolver
from trimail.net.stream import DirectStream
from trimail.net.tls import TlsPolicy

log = logging.getLogger("trimail.smtp")


def connect_error(exc: OSError) -> str:
    """A failed connect's errno text as Postfix writes it (``Connection refused``)."""
    return os.strerror(exc.errno) if exc.errno else exc.strerror or str(exc)


class ConnectionFailed(Exception):
    """No host of the destination could be used; ``outcome`` applies to everyone queued."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.text)
        self.outcome = outcome


class Connector:
    """Opens connections for routes: DNS, MX selection and loop detection (mx.Targets),
    greeting and EHLO (with the EHLO name loop check)."""

    def __init__(self, config: Config, resolver: Resolver,
                 own_addresses: list[ListenAddress] | Callable[[], list[ListenAddress]],
                 interfaces: OwnAddresses | None = None) -> None:
        self.resolver = resolver
        self.own = own_addresses
        self.interfaces = interfaces or OwnAddresses()
        self._dns = (tuple(config.dns_nameservers), config.dns_concurrency_limit)
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        """Settings for connections opened from now on (a reload); new name servers
        get a resolver of their own (the one given at start kept asking the old ones)."""
        dns = (tuple(config.dns_nameservers), config.dns_concurrency_limit)
        if dns != self._dns:
            self.resolver, self._dns = Resolver(config.dns_nameservers, concurrency=config.dns_concurrency_limit), dns
        self.helo_name: str = config.myhostname
        self.timeouts = Timeouts.from_config(config)
        self.proxies = frozenset(ipaddress.ip_address(a) for a in config.proxy_interfaces)
        self.address_limit: int = config.smtp_mx_address_limit
        self.session_limit: int = config.smtp_mx_session_limit
        self.mime_conversion = not config.disable_mime_output_conversion
        self.line_limit: int = config.smtp_line_length_limit
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

    async def lookup(self, route: Route, *, skip: frozenset[str] = frozenset()) -> Targets:
        """The DNS half of ``open``: the mail hosts of *route* and the addresses of the
        best preference group that has any (``Targets.prepare``), looked up now;
        ConnectionFailed when the MX lookup fails.  A delivery worker calls it before
        it takes a delivery agent's slot, so that a destination whose DNS does not
        answer waits without one; later groups are looked up by ``open`` as needed."""
        try:
            hosts = await self.resolver.mx_hosts(route.nexthop) if route.mx else [MailHost(route.nexthop, 0)]
        except DnsError as exc:
            raise ConnectionFailed(dns_outcome(exc)) from None
        targets = Targets(self.resolver, route.nexthop, hosts, address_limit=self.address_limit,
                          is_self=lambda address: self._is_self(address, route.port), skip=skip)
        await targets.prepare()
        return targets

    async def open(self, route: Route, *, skip: frozenset[str] = frozenset(),
                   targets: Targets | None = None) -> Connection:
        """A session with the first mail host of *route* that greets and accepts EHLO
        (never one of the addresses in *skip*); ConnectionFailed with the reason
        when there is none.  *targets*: the hosts ``lookup`` found for *route* (else
        it is looked up now)."""
        if targets is None:
            targets = await self.lookup(route, skip=skip)
        # Postfix looks for loops only towards port 25: a content filter on another port
        # of this host is no loop.  Our own listeners are known exactly and always count.
        loop_detect = route.port == DEFAULT_PORT
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
                stream = await DirectStream.connect(address, port)  # *address*: from Resolver.addresses
        except trio.TooSlowError:
            return None, deferred("4.4.1", f"connect to {relay}: Connection timed out")
        except OSError as exc:
            return None, deferred("4.4.1", f"connect to {relay}: {connect_error(exc)}")
        conn = Connection(stream, host, address, port, self.timeouts)
        conn.mime_conversion, conn.line_limit = self.mime_conversion, self.line_limit
        try:
            reply = await conn.hello(self.helo_name, self.tls if tls else None)
        except TlsRequired as exc:
            await conn.close()
            return None, deferred("4.7.4", exc.text)
        except TlsFailed as exc:
            await conn.close()
            if self.tls.required:
                return None, deferred("4.7.5", exc.text)
            log.info("%s; trying again in clear (smtp_tls_security_level = may)", printable(exc.text, REPLY_TEXT_LIMIT))
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
