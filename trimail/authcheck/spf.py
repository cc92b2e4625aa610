"""SPF (RFC 7208): may this client IP address send mail for this domain?

``check_spf(resolver, ip, sender, helo)`` is section 4's ``check_host()`` for the
MAIL FROM identity, or for the HELO identity when the sender is null (section
2.4), and gives an ``SpfResult``: pass, fail, softfail, neutral, none, temperror
or permerror.  All DNS goes through trimail's trio resolver (``net/dns.py``).

Limits (section 4.6.4): at most 10 terms that cost DNS queries (include, a, mx,
ptr, exists, redirect) per check, at most 10 address lookups per ``mx`` and 10
names per ``ptr``, at most 2 void lookups (no records, or NXDOMAIN); going over
is a ``permerror``.  A DNS failure (SERVFAIL, timeout, refusal) is a
``temperror``.  The caller bounds the whole check with a time budget.

Not done: ``exp=`` explanations are parsed, never fetched (a reply to a rejected
client names the result and the domain instead); the ``p`` macro is ``unknown``,
as section 7.3 allows.

Parameters: none read (see trimail/authcheck/inbound.py).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re

from trimail.authcheck.spfrecord import (
    Directive,
    MacroEnv,
    SpfPermError,
    expand_domain,
    is_spf,
    parse,
)
from trimail.net.dns import DnsError, Resolver

LOOKUP_LIMIT = 10
VOID_LIMIT = 2
MX_ADDRESS_LIMIT = 10
PTR_NAME_LIMIT = 10
RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


class SpfTempError(Exception):
    """A DNS failure during the check: ``temperror``."""


@dataclasses.dataclass(frozen=True, slots=True)
class SpfResult:
    result: str  # one of RESULTS
    identity: str  # "mailfrom" or "helo"
    domain: str  # the domain checked
    sender: str  # the identity's value: the sender address, or postmaster@helo
    reason: str = ""


def valid_domain(domain: str) -> bool:
    """A fully qualified name SPF can check (section 4.3): two labels at least."""
    labels = domain.rstrip(".").split(".")
    return len(labels) >= 2 and len(domain) <= 253 and all(_LABEL.fullmatch(label) for label in labels)


class _Check:
    """One check_host() evaluation and the ones it starts (include, redirect),
    sharing the lookup counters."""

    def __init__(self, resolver: Resolver, ip: str, sender: str, helo: str) -> None:
        self.resolver = resolver
        address = ipaddress.ip_address(ip)
        if address.version == 6 and address.ipv4_mapped:
            address = address.ipv4_mapped
        self.ip = address
        self.sender = sender
        self.helo = helo
        self.lookups = 0
        self.voids = 0

    def count(self) -> None:
        self.lookups += 1
        if self.lookups > LOOKUP_LIMIT:
            raise SpfPermError(f"more than {LOOKUP_LIMIT} DNS lookups")

    async def query(self, name: str, rdtype: str, *, void_counts: bool = True) -> list[str]:
        try:
            records = await self.resolver.lookup(name, rdtype)
        except DnsError as exc:
            raise SpfTempError(f"DNS failure for {name} {rdtype}: {exc.text}") from None
        if not records and void_counts:
            self.voids += 1
            if self.voids > VOID_LIMIT:
                raise SpfPermError(f"more than {VOID_LIMIT} void DNS lookups")
        return records or []

    async def record(self, domain: str) -> str | None:
        """The domain's one SPF record, None when it has none; permerror for two."""
        records = [r for r in await self.query(domain, "TXT", void_counts=False) if is_spf(r)]
        if len(records) > 1:
            raise SpfPermError(f"more than one SPF record for {domain}")
        return records[0] if records else None

    async def check_host(self, domain: str) -> str:
        """Section 4: the result for *domain*; raises SpfPermError / SpfTempError."""
        if not valid_domain(domain):
            return "none"
        text = await self.record(domain)
        if text is None:
            return "none"
        record = parse(text)
        env = MacroEnv(self.sender, domain, str(self.ip), self.helo)
        for directive in record.directives:
            if await self.matches(directive, env):
                return directive.qualifier
        if record.redirect is not None and not any(d.mechanism == "all" for d in record.directives):
            self.count()
            target = expand_domain(record.redirect, env)
            result = await self.check_host(target)
            if result == "none":
                raise SpfPermError(f"redirect={target} has no SPF record")
            return result
        return "neutral"

    def _in(self, addresses: list[str], directive: Directive) -> bool:
        length = (directive.cidr4 if self.ip.version == 4 else directive.cidr6)
        length = self.ip.max_prefixlen if length is None else length
        for text in addresses:
            try:
                network = ipaddress.ip_network(f"{text}/{length}", strict=False)
            except ValueError:
                continue
            if network.version == self.ip.version and self.ip in network:
                return True
        return False

    @property
    def _address_type(self) -> str:
        return "A" if self.ip.version == 4 else "AAAA"

    async def matches(self, directive: Directive, env: MacroEnv) -> bool:
        mechanism = directive.mechanism
        if mechanism == "all":
            return True
        if mechanism in ("ip4", "ip6"):
            assert directive.network is not None
            return self._in([directive.network], directive)
        self.count()
        target = expand_domain(directive.domain, env) if directive.domain else env.domain
        if mechanism == "include":
            result = await self.check_host(target)
            if result in ("permerror", "none"):
                raise SpfPermError(f"include:{target}: {result}")
            return result == "pass"
        if mechanism == "exists":
            return bool(await self.query(target, "A"))
        if mechanism == "a":
            return self._in(await self.query(target, self._address_type), directive)
        if mechanism == "mx":
            return await self._mx(target, directive)
        return await self._ptr(target)

    async def _mx(self, target: str, directive: Directive) -> bool:
        exchanges = []
        for text in await self.query(target, "MX"):
            parts = text.split()
            if len(parts) == 2 and parts[1] != ".":
                exchanges.append(parts[1].rstrip("."))
        if len(exchanges) > MX_ADDRESS_LIMIT:
            raise SpfPermError(f"more than {MX_ADDRESS_LIMIT} MX records for {target}")
        for exchange in exchanges:
            if self._in(await self.query(exchange, self._address_type, void_counts=False), directive):
                return True
        return False

    async def _ptr(self, target: str) -> bool:
        """Section 5.5: a validated PTR name equal to or below *target*; DNS
        trouble here is no match, never an error."""
        try:
            names = await self.resolver.reverse(str(self.ip)) or []
        except DnsError:
            return False
        target = target.lower().rstrip(".")
        for name in names[:PTR_NAME_LIMIT]:
            try:
                addresses = await self.resolver.lookup(name, self._address_type) or []
            except DnsError:
                continue
            if str(self.ip) in {str(ipaddress.ip_address(a)) for a in addresses} and (
                    name == target or name.endswith("." + target)):
                return True
        return False


async def check_spf(resolver: Resolver, ip: str, sender: str, helo: str) -> SpfResult:
    """The SPF result for the MAIL FROM *sender* (the HELO name when it is null)."""
    if sender and "@" in sender:
        identity, domain, address = "mailfrom", sender.rpartition("@")[2], sender
    else:
        identity, domain, address = "helo", helo, f"postmaster@{helo}"
    domain = domain.rstrip(".").lower()
    if address.startswith("@"):
        address = "postmaster" + address
    try:
        check = _Check(resolver, ip, address, helo)
    except ValueError:
        return SpfResult("none", identity, domain, address, "no IP address")
    try:
        result = await check.check_host(domain)
        reason = {"pass": f"{domain}: {check.ip} is designated", "neutral": f"{domain}: no statement about {check.ip}",
                  "none": f"{domain}: no SPF record"}.get(result, f"{domain}: {check.ip} is not designated")
    except SpfPermError as exc:
        result, reason = "permerror", f"{domain}: {exc}"
    except SpfTempError as exc:
        result, reason = "temperror", str(exc)
    return SpfResult(result, identity, domain, address, reason)
