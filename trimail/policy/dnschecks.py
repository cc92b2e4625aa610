"""DNS facts the restrictions decide on, cached per session: does a mail domain or a
host name exist, the client's PTR names and its forward-confirmed name, and DNS
list (RBL/RHSBL/DNSWL) answers.

Answers are cached in the request's session cache (one dict per SMTP session,
so bounded by what one client can ask).  A DNS list's TXT record goes into our
reply and the log, so it is made printable and bounded here.

Parameters: none of its own (the resolver uses dns_nameservers).
"""

from __future__ import annotations

import ipaddress
import re
from typing import TYPE_CHECKING

from trimail.log import printable
from trimail.net.dns import DnsError, DnsTemporary
from trimail.smtp.replies import Reply

if TYPE_CHECKING:
    from trimail.net.dns import Resolver
    from trimail.policy.engine import Request


class DnsChecks:
    resolver: Resolver

    async def domain_state(self, req: Request, domain: str) -> str:
        """"ok", "missing" or "temp" for a mail domain (MX, else A/AAAA); cached per session."""
        key = ("domain", domain)
        if key not in req.cache:
            try:
                mx = await self.resolver.lookup(domain, "MX")
                if mx is None:
                    state = "missing"
                elif mx:
                    state = "ok"
                else:
                    state = "ok" if (await self.resolver.lookup(domain, "A") or
                                     await self.resolver.lookup(domain, "AAAA")) else "missing"
            except DnsError:
                state = "temp"
            req.cache[key] = state
        return req.cache[key]

    async def host_state(self, req: Request, name: str) -> str:
        """"ok", "missing" or "temp" for a host name: an A, AAAA or MX record (Postfix's
        reject_unknown_hostname; a null MX counts as existing)."""
        key = ("host", name)
        if key not in req.cache:
            state = "missing"
            try:
                for rdtype in ("A", "AAAA", "MX"):
                    if await self.resolver.lookup(name, rdtype):
                        state = "ok"
                        break
            except DnsError:
                state = "temp"
            req.cache[key] = state
        return req.cache[key]

    async def reverse_names(self, req: Request) -> list[str] | None | str:
        """The client's PTR names (None: none; "temp": temporary failure)."""
        key = ("ptr", req.client_address)
        if key not in req.cache:
            try:
                req.cache[key] = await self.resolver.reverse(req.client_address)
            except DnsTemporary:
                req.cache[key] = "temp"
        return req.cache[key]

    async def reverse_name(self, req: Request) -> str | None:
        """Postfix's reverse_client_name: the first PTR name, verified or not."""
        names = await self.reverse_names(req)
        return names[0] if isinstance(names, list) and names else None

    async def client_hostname(self, req: Request) -> str | None:
        """The forward-confirmed name of the client, or None."""
        key = ("fcrdns", req.client_address)
        if key not in req.cache:
            names = await self.reverse_names(req)
            confirmed = None
            if isinstance(names, list):
                for name in names:
                    try:
                        if req.client_address in await self.resolver.addresses(name):
                            confirmed = name
                            break
                    except DnsError:
                        continue
            req.cache[key] = confirmed
        return req.cache[key]

    async def listed(self, req: Request, name: str, zone_arg: str) -> tuple[bool, str] | None:
        """(listed, TXT) for *name* in the DNS list ``zone[=a.b.c.d]``; None on trouble."""
        zone, _, wanted = zone_arg.partition("=")
        key = ("dnsbl", name, zone_arg)
        if key not in req.cache:
            try:
                records = await self.resolver.lookup(f"{name}.{zone}", "A")
            except DnsError:
                req.cache[key] = None
                return None
            hits = [r for r in (records or []) if not wanted or matches_filter(r, wanted)]
            text = ""
            if hits:
                try:
                    # the list's own words go into our reply and the log: printable, bounded
                    text = printable(" ".join(await self.resolver.lookup(f"{name}.{zone}", "TXT") or []), 200)
                except DnsError:
                    pass
            req.cache[key] = (bool(hits), text)
        return req.cache[key]

    async def rbl_reply(self, req: Request, what: str, value: str, name: str, zone: str) -> Reply | None:
        listed = await self.listed(req, name, zone)
        if not listed or not listed[0]:
            return None
        text = f"Service unavailable; {what} [{value}] blocked using {zone.partition('=')[0]}"
        if listed[1]:
            text += f"; {listed[1]}"
        return Reply(554, "5.7.1", text)


def reversed_ip(address: str) -> str | None:
    """The DNS list query label of an IP address (``4.3.2.1`` / nibbles), None if not one."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if ip.version == 4:
        return ".".join(reversed(str(ip).split(".")))
    return ".".join(reversed(ip.exploded.replace(":", "")))


def fqdn(domain: str) -> bool:
    return "." in domain.strip(".") or address_literal(domain)


def address_literal(text: str) -> bool:
    return text.startswith("[") and text.endswith("]")


def hostname(text: str) -> bool:
    return len(text) <= 255 and all(
        re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?|[A-Za-z0-9_]", label)
        for label in text.rstrip(".").split("."))


def matches_filter(address: str, wanted: str) -> bool:
    """``127.0.0.[2..11]``-style filters of reject_rbl_client zone=filter."""
    parts = address.split(".")
    patterns = re.findall(r"\[[^\]]*\]|[^.]+", wanted)
    if len(parts) != 4 or len(patterns) != 4:
        return address == wanted
    for part, pattern in zip(parts, patterns, strict=True):
        if pattern.startswith("["):
            allowed = set()
            for item in pattern[1:-1].split(";"):
                lo, _, hi = item.partition("..")
                allowed |= set(range(int(lo), int(hi or lo) + 1))
            if int(part) not in allowed:
                return False
        elif pattern != part:
            return False
    return True
