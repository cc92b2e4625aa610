"""The one address resolver (Postfix's trivial-rewrite(8) resolve).

``resolve(address, settings)`` says where mail for *address* goes: its final local
part and domain, and its class:

- ``local``: a domain in ``mydestination``, an address literal naming this host
  (``[ip]`` or ``[IPv6:ip]`` where ip is one of ``own_addresses``: Postfix's
  resolve_local() takes the literals of $inet_interfaces and $proxy_interfaces), or
  no domain at all (``local_transport``);
- ``virtual_alias``: a domain in ``virtual_alias_domains``: its users exist only as
  keys of ``virtual_alias_maps``, whatever the table does not rewrite is unknown;
- ``virtual_mailbox``: a domain in ``virtual_mailbox_domains``, delivered by the
  virtual(8) agent to the mailboxes of ``virtual_mailbox_maps`` (``virtual_transport``);
- ``relay``: a domain this gateway relays for (``relay_domains``, ``relay_transport``);
- ``remote``: any other domain (Postfix's default class, ``default_transport``);
- ``invalid``: an address that cannot be resolved: a control character, an empty local part, a domain
  that is empty after ``@`` (``resolve_null_domain = no``, Postfix's default) or
  that is not a domain DNS can express, or an address whose rewriting does not end.

The relay decision, the recipient that is stored and the route all come from this
one function, so they cannot disagree.  Each round first rewrites the address in
Postfix's ``local`` context (``canonical()``, trivial-rewrite's rewrite_tree, which
Postfix's smtpd applies before it resolves and cleanup applies to every envelope
address): without a domain, ``host!user`` becomes ``user@host`` (``swap_bangpath``),
else ``user%host`` becomes ``user@host`` (``allow_percent_hack``), else ``user``
becomes ``user@$myorigin`` (``append_at_myorigin``); then ``user@host`` becomes
``user@host.$mydomain`` (``append_dot_mydomain``, a domain without a dot).  So an
unqualified name is resolved, relay-checked and stored as ``user@$myorigin``: a bare
name is local only when ``$myorigin`` is, and never opens relaying.  Still unqualified
(``append_at_myorigin = no``), it takes ``@$myhostname`` as in Postfix's resolve.c.
Rules, in Postfix's order, applied again
to the result while the domain is local: a source route (``@a,@b:``, up to the first
colon outside brackets and quotes) is dropped; the local part is dequoted
(``resolve_dequoted_address``); an ``@`` left in the local part of a local domain
resolves again (``user@remote@local``); ``host!user`` becomes ``user@host``
(``swap_bangpath``); ``user%host`` becomes ``user@host`` only with
``allow_percent_hack``; trailing dots are dropped from the domain.  Each round
removes a domain, so a valid address resolves in fewer rounds than it has
characters; anything that does not is ``invalid``, never local.

The classes are tried in Postfix's order (local, virtual alias, virtual mailbox,
relay, remote), so a domain listed twice takes the first; Postfix calls that a
configuration error ("do not list domain X in BOTH mydestination and
virtual_alias_domains"), and ``Settings.overlaps`` gives those lines for serve and
``trimail check`` to report.  The virtual domain lists match whole names (no
subdomains); relay_domains follows ``parent_domain_matches_subdomains``.  Domain
lists here are names: Postfix's ``type:table`` entries in a domain list are not
supported, and refused at load for the two virtual lists (Postfix's default
``virtual_alias_domains = $virtual_alias_maps`` makes every domain that is a key of
the table a virtual alias domain; trimail's default is empty, list the domains by
name).

Whether a user of a class exists (local_recipient_maps, virtual_alias_maps,
virtual_mailbox_maps, relay_recipient_maps) is a table lookup, made by the
callers (smtpd at RCPT, cleanup), never here.

Our own addresses: trimail's inet_interfaces are the addresses serve listens on
(smtpd_listen, submission_listen, smtps_listen); a wildcard listener (``0.0.0.0``,
``[::]``) means every address of the host's interfaces (``trimail/delivery/interfaces.py``,
as Postfix's ``inet_interfaces = all``), plus ``proxy_interfaces``.  A literal is
compared exactly (no IPv4-mapped IPv6, no other 127/8 address): anything else keeps
its class, so ``user@[192.0.2.1]`` is still remote and relaying.

Security notes: ``invalid`` is refused at RCPT (``501 5.1.3 Bad recipient address
syntax``); ``resolve`` does no I/O (``Settings.from_config`` reads the interface
list once, only when a listener is a wildcard).

Parameters: mydestination, virtual_alias_domains, virtual_mailbox_domains,
relay_domains, parent_domain_matches_subdomains, smtpd_listen, submission_listen,
smtps_listen, proxy_interfaces, myorigin, mydomain, myhostname, append_at_myorigin,
append_dot_mydomain, swap_bangpath, allow_percent_hack, resolve_dequoted_address, resolve_null_domain.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from typing import Literal

from trimail.smtp.address import _DOT_STRING, _QUOTED, dns_name, is_domain, source_route_end

AddressClass = Literal["local", "virtual_alias", "virtual_mailbox", "relay", "remote", "invalid"]
# the classes whose mail this host accepts from anyone (Postfix's permit_auth_destination)
AUTHORIZED: frozenset[str] = frozenset({"local", "virtual_alias", "virtual_mailbox", "relay"})


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    local_domains: frozenset[str]
    relay_domains: frozenset[str] = frozenset()
    relay_subdomains: bool = True  # parent_domain_matches_subdomains names relay_domains
    swap_bangpath: bool = True
    percent_hack: bool = False
    dequote: bool = True
    null_domain: bool = False
    virtual_alias_domains: frozenset[str] = frozenset()
    virtual_mailbox_domains: frozenset[str] = frozenset()
    own_addresses: frozenset[str] = frozenset()  # IP addresses (ipaddress's str) whose literals are local
    origin: str = ""  # myorigin, when append_at_myorigin: what a bare name is qualified with
    mydomain: str = ""  # when append_dot_mydomain: appended to a domain without a dot
    myhostname: str = ""  # Postfix's resolve: a name still unqualified takes @$myhostname

    @classmethod
    def from_config(cls, config: object) -> Settings:
        """The settings of *config*: made once per configuration (``Config.memo``), though
        the router, the local agent and every listener's policy ask for them."""
        memo = getattr(config, "memo", None)
        if memo is not None:
            return memo("rewrite.Settings", lambda: cls._made(config))  # type: ignore[no-any-return]
        return cls._made(config)

    @classmethod
    def _made(cls, config: object) -> Settings:
        get = config.get  # type: ignore[attr-defined]

        def names(param: str) -> frozenset[str]:
            return frozenset(d.lower().rstrip(".") for d in get(param))

        return cls(local_domains=names("mydestination"), relay_domains=names("relay_domains"),
                   virtual_alias_domains=names("virtual_alias_domains"),
                   virtual_mailbox_domains=names("virtual_mailbox_domains"),
                   relay_subdomains="relay_domains" in get("parent_domain_matches_subdomains"),
                   swap_bangpath=get("swap_bangpath"), percent_hack=get("allow_percent_hack"),
                   dequote=get("resolve_dequoted_address"), null_domain=get("resolve_null_domain"),
                   own_addresses=own_addresses(config),
                   origin=get("myorigin").lower().rstrip(".") if get("append_at_myorigin") else "",
                   mydomain=get("mydomain").lower().rstrip(".") if get("append_dot_mydomain") else "",
                   myhostname=get("myhostname").lower().rstrip("."))

    def overlaps(self) -> list[str]:
        """Postfix's warnings for a domain listed in two class lists (each list should
        be disjoint from the others; the first class in resolve's order wins)."""
        lists = [("mydestination", self.local_domains), ("virtual_alias_domains", self.virtual_alias_domains),
                 ("virtual_mailbox_domains", self.virtual_mailbox_domains), ("relay_domains", self.relay_domains)]
        found = []
        for i, (first, domains) in enumerate(lists):
            for second, others in lists[i + 1:]:
                if first == "mydestination" and second == "relay_domains":
                    continue  # Postfix: local wins silently (relay_domains often lists $mydestination)
                for domain in sorted(domains & others):
                    found.append(f"do not list domain {domain} in BOTH {first} and {second}")
        return found


@dataclasses.dataclass(frozen=True, slots=True)
class Resolved:
    local: str
    domain: str  # lower case, no trailing dot; "" for an unqualified local address
    klass: AddressClass

    @property
    def address(self) -> str:
        """The address the queue stores and the router routes: the resolved local
        part, quoted again when it needs quotes (RFC 5321 Quoted-string)."""
        plain = _DOT_STRING.fullmatch(self.local) or _QUOTED.fullmatch(self.local)
        local = self.local if plain else _quoted(self.local)
        return f"{local}@{self.domain}" if self.domain else local

    def stored(self, written: str) -> str:
        """The recipient the queue stores for *written* (the address as the client
        wrote it, which resolved to this): the resolution the relay decision was made
        on; an address that needed no rewriting keeps the client's spelling, less
        trailing dots."""
        if "@" in written and self.domain == written.rpartition("@")[2].lower().rstrip("."):
            return written.rstrip(".")
        return self.address


INVALID = Resolved("", "", "invalid")


def _quoted(local: str) -> str:
    return '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _dequoted(local: str) -> str:
    if len(local) >= 2 and local.startswith('"') and local.endswith('"'):
        return local[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    return local


def _split(address: str) -> tuple[str, str | None]:
    """(local part, domain or None when there is no domain); a quoted local part
    alone (``"a@b"``) has none."""
    local, at, domain = address.rpartition("@")
    if not at or _QUOTED.fullmatch(address):
        return address, None
    return local, domain


def canonical(address: str, settings: Settings) -> str:
    """*address* rewritten in Postfix's ``local`` context (rewrite_tree): bang path,
    percent hack or ``@$myorigin`` for a name without a domain, then
    ``append_dot_mydomain``.  The null address and source routes are left alone."""
    if not address or address.startswith("@"):
        return address
    local, domain = _split(address)
    if domain is None:
        quoted = local.startswith('"')
        if settings.swap_bangpath and "!" in local and not quoted:
            host, _, user = local.partition("!")
            local, domain = user, host
        elif settings.percent_hack and "%" in local and not quoted:
            local, _, domain = local.rpartition("%")
        elif settings.origin:
            domain = settings.origin
        else:
            return address
    if (settings.mydomain and domain and "." not in domain and not domain.startswith("[")):
        domain = f"{domain}.{settings.mydomain}"
    return f"{local}@{domain}"


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def resolve(address: str, settings: Settings) -> Resolved:
    """Resolve *address* (a path as the SMTP parser returns it) as described above."""
    if _CONTROL.search(address):  # CR, LF, NUL ...: never on the wire
        return INVALID
    for _ in range(len(address) + 2):
        while 0 <= (route_end := source_route_end(address)) < len(address) - 1:
            address = address[route_end + 1:]  # a source route: RFC 5321 says ignore it (resolve.c)
        address = canonical(address, settings)
        local, split_domain = _split(address)
        if split_domain is None and settings.myhostname:
            local, split_domain = address, settings.myhostname  # resolve.c: "@$myhostname for compatibility"
        domain = split_domain or ""
        at = split_domain is not None
        if settings.dequote:
            local = _dequoted(local)
        domain = domain.lower().rstrip(".")
        if at and not domain and not settings.null_domain:
            return INVALID
        if not local:
            return INVALID
        if domain and domain not in settings.local_domains and not _own_literal(domain, settings):
            if not is_domain(domain) or (not domain.startswith("[") and dns_name(domain) is None):
                return INVALID
            return Resolved(local, domain, _class_of(domain, settings))
        # a local domain (or none): the local part may route further
        if "@" in local:
            address = local
            continue
        if settings.swap_bangpath and "!" in local:
            host, _, user = local.partition("!")
            address = f"{user}@{host}"
            continue
        if settings.percent_hack and "%" in local:
            user, _, host = local.rpartition("%")
            address = f"{user}@{host}"
            continue
        return Resolved(local, domain, "local")
    return INVALID  # rewriting that does not end is never local


def own_addresses(config: object, proxies: bool = True) -> frozenset[str]:
    """The addresses whose literals are this host: the listeners' addresses (every
    interface address when one is a wildcard) and, with *proxies*, proxy_interfaces."""
    get = config.get  # type: ignore[attr-defined]
    found: set[str] = set(get("proxy_interfaces")) if proxies else set()
    wildcard = False
    for parameter in ("smtpd_listen", "submission_listen", "smtps_listen"):
        for listen in get(parameter):
            ip = _ip(listen.host.strip("[]"))
            if ip is None:
                continue
            wildcard = wildcard or ip.is_unspecified
            found.add(str(ip))
    if wildcard:
        from trimail.delivery.interfaces import interface_addresses

        found |= {str(ip) for ip in interface_addresses()}
    return frozenset(found - {"0.0.0.0", "::"})


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _own_literal(domain: str, settings: Settings) -> bool:
    """*domain* (lower case) is ``[ipv4]`` or ``[ipv6:ip]`` naming one of our addresses."""
    if not settings.own_addresses or not (domain.startswith("[") and domain.endswith("]")):
        return False
    literal = domain[1:-1]
    if literal.startswith("ipv6:"):
        ip = _ip(literal[5:])
        return ip is not None and ip.version == 6 and str(ip) in settings.own_addresses
    ip = _ip(literal)
    return ip is not None and ip.version == 4 and str(ip) in settings.own_addresses


def _class_of(domain: str, settings: Settings) -> AddressClass:
    """The class of a valid domain that is not in mydestination (resolve.c's order)."""
    if domain in settings.virtual_alias_domains:
        return "virtual_alias"
    if domain in settings.virtual_mailbox_domains:
        return "virtual_mailbox"
    return "relay" if _relays_for(domain, settings) else "remote"


def _relays_for(domain: str, settings: Settings) -> bool:
    return domain_listed(domain, settings.relay_domains, settings.relay_subdomains)


def domain_listed(domain: str, entries: frozenset[str], subdomains: bool) -> bool:
    """Postfix's domain list match for *domain* (lower case, no trailing dot): an
    entry matches itself; ``.parent`` matches every name below parent; ``parent``
    matches the names below it too when *subdomains* (parent_domain_matches_subdomains
    names the list)."""
    if domain in entries:
        return True
    return any(domain.endswith(entry) if entry.startswith(".") else subdomains and domain.endswith("." + entry)
               for entry in entries)
