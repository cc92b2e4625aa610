"""Where a recipient goes: transport_maps, then the transport of its address class.

The class comes from the one resolver (``trimail/rewrite.py``), as in Postfix's
trivial-rewrite: local -> ``local_transport``; virtual mailbox ->
``virtual_transport``; relay -> ``relay_transport``; remote -> ``default_transport``;
relay and remote go to ``relayhost`` when it is set, unless their transport names
a nexthop of its own.  A recipient of a virtual alias domain that is still there
(virtual_alias_maps did not rewrite it at receipt) goes to the ``error``
transport, ``5.1.1 User unknown in virtual alias table``, and transport_maps do
not apply to it (Postfix).

The result is a ``Route``: a transport (smtp, relay, lmtp, local, virtual, error,
discard, retry), a
nexthop and whether the nexthop is a domain to look up MX records for.  Nexthop
syntax is Postfix's (transport(5)): ``[host]:port`` or ``[host]`` means that host
without MX lookup, ``host:port`` or ``host`` means MX lookup for host.

transport_maps keys are tried as transport(5) says: the full address, the domain,
then each parent domain as ``.parent`` and finally ``*``.  An empty transport in
the result means ``default_transport``; an empty nexthop means the recipient's
domain.

A recipient whose domain cannot be a DNS name (a label over 63 octets, over 255
octets in wire form, an empty label, a U-label IDNA cannot encode) goes to the
``error`` transport with ``5.1.3 bad address syntax`` before any table is
consulted, as Postfix's trivial-rewrite and qmgr do: it bounces, and no
lookup ever sees the name.  smtpd refuses such names at RCPT; this catches mail
queued before that rule, or by other means.

A message's FILTER (the access-table action, stored by smtpd in the message's
params under ``FILTER_PARAM``, a key no SMTP client can send) overrides the route
of every recipient of that message: ``transport:nexthop``, or ``transport:`` to
keep each recipient's own nexthop (Postfix's FILTER; the last one wins at smtpd).
Only an address the resolver cannot resolve still goes to the error transport.

Parameters: myhostname, transport_maps, mydestination, virtual_alias_domains,
virtual_mailbox_domains, relay_domains, relayhost, local_transport,
virtual_transport, relay_transport, default_transport.
"""

from __future__ import annotations

import dataclasses
import logging

from trimail import rewrite
from trimail.config import Config
from trimail.config.params_filter import NEXTHOP
from trimail.maps import Table, lookup_first, open_table

log = logging.getLogger("trimail.route")

DEFAULT_PORT = 25
SMTP_TRANSPORTS = frozenset({"smtp", "relay", "lmtp"})
BAD_ADDRESS_SYNTAX = "5.1.3 bad address syntax"  # Postfix qmgr's words for the error transport
FILTER_PARAM = "_FILTER"  # message params key of its content filter ("_" is not in an esmtp-keyword)
CHECKS_FILTER_PARAM = "_CHECKS_FILTER"  # a local submission's FILTER from header/body checks (pickup keeps it)
UNKNOWN_VIRTUAL_ALIAS = "5.1.1 User unknown in virtual alias table"  # Postfix trivial-rewrite's


class RouteError(Exception):
    """A transport or nexthop that cannot be used (bad table entry)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Route:
    transport: str
    nexthop: str  # host or domain; for error/discard, the text
    port: int = DEFAULT_PORT
    mx: bool = True

    @property
    def key(self) -> tuple[str, str, int, bool]:
        return (self.transport, self.nexthop, self.port, self.mx)

    def __str__(self) -> str:
        if self.transport not in SMTP_TRANSPORTS:
            return f"{self.transport}:{self.nexthop}"
        host = self.nexthop if self.mx else f"[{self.nexthop}]"
        return f"{self.transport}:{host}" + (f":{self.port}" if self.port != DEFAULT_PORT else "")


def parse_nexthop(text: str) -> tuple[str, int, bool]:
    """``[host]:port`` / ``[host]`` (no MX) or ``host:port`` / ``host`` (MX)."""
    m = NEXTHOP.fullmatch(text.strip())
    if not m:
        raise RouteError(f"bad nexthop {text!r}")
    if m.group(1):
        return m.group(1).lower(), int(m.group(2) or DEFAULT_PORT), False
    return m.group(3).lower(), int(m.group(4) or DEFAULT_PORT), True


class Router:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.tables: list[Table] = [open_table(ref, lazy=True) for ref in config.transport_maps]
        self.rewrite = rewrite.Settings.from_config(config)
        for warning in self.rewrite.overlaps():
            log.warning("%s", warning)
        self.default_transport: str = config.default_transport
        self.transports: dict[str, str] = {"local": config.local_transport, "virtual_mailbox": config.virtual_transport,
                                           "relay": config.relay_transport, "remote": config.default_transport}

    def route(self, recipient: str, content_filter: str | None = None) -> Route:
        """Where *recipient* goes; *content_filter* (a message's FILTER) overrides it."""
        resolved = rewrite.resolve(recipient, self.rewrite)  # the one resolver (relay control used it too)
        if resolved.klass == "invalid":
            return Route("error", BAD_ADDRESS_SYNTAX, mx=False)
        if content_filter:
            return self._filtered(content_filter, recipient)
        if resolved.klass == "virtual_alias":
            return Route("error", UNKNOWN_VIRTUAL_ALIAS, mx=False)
        domain = resolved.domain or self.config.myhostname
        entry = self._transport_entry(resolved.address, resolved.domain)
        if entry is not None:
            return self._from_entry(entry, domain)
        entry = self.transports[resolved.klass]
        relayhost = self.config.relayhost
        if resolved.klass in ("relay", "remote") and relayhost and not entry.partition(":")[2].strip():
            host, port, mx = parse_nexthop(relayhost)
            return Route(entry.partition(":")[0] or self.default_transport_name(), host, port, mx)
        return self._from_entry(entry, domain)

    def default_transport_name(self) -> str:
        return self.default_transport.partition(":")[0] or "smtp"

    def _transport_entry(self, recipient: str, domain: str) -> str | None:
        if not self.tables:
            return None
        keys = [recipient.lower(), domain]
        labels = domain.split(".")
        keys += ["." + ".".join(labels[i:]) for i in range(1, len(labels))]
        keys.append("*")
        for key in keys:
            value = lookup_first(self.tables, key)
            if value is not None:
                return value
        return None

    def _from_entry(self, entry: str, domain: str) -> Route:
        transport, _, nexthop = entry.strip().partition(":")
        transport = transport or self.default_transport_name()
        if transport in ("error", "discard", "retry"):
            return Route(transport, nexthop.strip(), mx=False)
        if transport in ("local", "virtual"):
            return Route(transport, nexthop.strip() or domain, mx=False)
        if transport not in SMTP_TRANSPORTS:
            raise RouteError(f"unknown transport {transport!r} in {entry!r}")
        if not nexthop:
            return Route(transport, domain)
        host, port, mx = parse_nexthop(nexthop)
        return Route(transport, host, port, mx)

    def _filtered(self, content_filter: str, recipient: str) -> Route:
        transport, _, nexthop = content_filter.strip().partition(":")
        if transport not in SMTP_TRANSPORTS:
            raise RouteError(f"unknown transport {transport!r} in FILTER {content_filter!r}")
        if not nexthop:  # "transport:": this transport to the recipient's own nexthop
            own = self.route(recipient)
            if own.transport in SMTP_TRANSPORTS:
                return Route(transport, own.nexthop, own.port, own.mx)
            # local, virtual, error or discard: never past the filter; Postfix's (empty)
            # default_filter_nexthop, the recipient's domain
            domain = rewrite.resolve(recipient, self.rewrite).domain or self.config.myhostname
            host, port, mx = parse_nexthop(domain)
            return Route(transport, host, port, mx)
        host, port, mx = parse_nexthop(nexthop)
        return Route(transport, host, port, mx)
