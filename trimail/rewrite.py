"""The one address resolver (Postfix's trivial-rewrite(8) resolve).

``resolve(address, settings)`` says where mail for *address* goes: its final local
part and domain, and its class:

- ``local``: a domain in ``mydestination``, or no domain at all;
- ``relay``: a domain this gateway relays for (``relay_domains``);
- ``remote``: any other domain (the default transport);
- ``invalid``: an address that cannot be resolved: a control character, an empty local part, a domain
  that is empty after ``@`` (``resolve_null_domain = no``, Postfix's default) or
  that is not a domain DNS can express, or an address whose rewriting does not end.

The relay decision, the recipient that is stored and the route all come from this
one function, so they cannot disagree.  Rules, in Postfix's order, applied again
to the result while the domain is local: the local part is dequoted
(``resolve_dequoted_address``); an ``@`` left in the local part of a local domain
resolves again (``user@remote@local``); ``host!user`` becomes ``user@host``
(``swap_bangpath``); ``user%host`` becomes ``user@host`` only with
``allow_percent_hack``; trailing dots are dropped from the domain.  Each round
removes a domain, so a valid address resolves in fewer rounds than it has
characters; anything that does not is ``invalid``, never local.

Security notes: ``invalid`` is refused at RCPT (``501 5.1.3 Bad recipient address
syntax``); nothing here does I/O.

Parameters: mydestination, relay_domains, parent_domain_matches_subdomains,
swap_bangpath, allow_percent_hack, resolve_dequoted_address, resolve_null_domain.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from trimail.smtp.address import _DOT_STRING, _QUOTED, dns_name, is_domain

AddressClass = Literal["local", "relay", "remote", "invalid"]


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    local_domains: frozenset[str]
    relay_domains: frozenset[str] = frozenset()
    relay_subdomains: bool = True  # parent_domain_matches_subdomains names relay_domains
    swap_bangpath: bool = True
    percent_hack: bool = False
    dequote: bool = True
    null_domain: bool = False

    @classmethod
    def from_config(cls, config: object) -> Settings:
        get = config.get  # type: ignore[attr-defined]
        return cls(local_domains=frozenset(d.lower().rstrip(".") for d in get("mydestination")),
                   relay_domains=frozenset(d.lower().rstrip(".") for d in get("relay_domains")),
                   relay_subdomains="relay_domains" in get("parent_domain_matches_subdomains"),
                   swap_bangpath=get("swap_bangpath"), percent_hack=get("allow_percent_hack"),
                   dequote=get("resolve_dequoted_address"), null_domain=get("resolve_null_domain"))


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


INVALID = Resolved("", "", "invalid")


def _quoted(local: str) -> str:
    return '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _dequoted(local: str) -> str:
    if len(local) >= 2 and local.startswith('"') and local.endswith('"'):
        return local[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    return local


def resolve(address: str, settings: Settings) -> Resolved:
    """Resolve *address* (a path as the SMTP parser returns it) as described above."""
    if any(ord(ch) < 0x20 or ch == "\x7f" for ch in address):  # CR, LF, NUL ...: never on the wire
        return INVALID
    if address.startswith("@") and ":" in address:  # a source route: RFC 5321 says ignore it
        address = address.rpartition(":")[2]
    for _ in range(len(address) + 2):
        local, at, domain = address.rpartition("@")
        if not at:
            local, domain = address, ""
        if settings.dequote:
            local = _dequoted(local)
        domain = domain.lower().rstrip(".")
        if at and not domain and not settings.null_domain:
            return INVALID
        if not local:
            return INVALID
        if domain and domain not in settings.local_domains:
            if not is_domain(domain) or (not domain.startswith("[") and dns_name(domain) is None):
                return INVALID
            return Resolved(local, domain, "relay" if _relays_for(domain, settings) else "remote")
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


def _relays_for(domain: str, settings: Settings) -> bool:
    if domain in settings.relay_domains:
        return True
    if settings.relay_subdomains:
        return any(domain.endswith("." + d) for d in settings.relay_domains if not d.startswith("."))
    return any(d.startswith(".") and domain.endswith(d) for d in settings.relay_domains)
