"""DMARC (RFC 7489): does an authenticated identifier align with the From: domain,
and what does the From: domain ask us to do when none does?

``check_dmarc(resolver, from_domain, spf, dkims)``: the policy record is looked up
at ``_dmarc.<From domain>``, then at ``_dmarc.<organisational domain>`` (section
6.6.3; the organisational domain from the public suffix list packaged with
``publicsuffixlist``, read once).  SPF aligns when it passed for a domain that is
the From: domain (``aspf=s``) or has the same organisational domain (``aspf=r``,
the default; for the null sender that is the HELO name, RFC 7208 section 2.4); DKIM likewise with a passing signature's ``d=`` (``adkim``).  The
policy is ``p=``, or ``sp=`` when the record came from the organisational domain
for a subdomain; ``pct=`` applies it to that share of failing messages (the rest
get the next milder one, section 6.6.4).

Security notes: the From: header is the sender's word: a message with no From:
address, or several, is reported ``permerror`` (RFC 7489 section 6.6.1 lets the
receiver refuse such mail), never guessed at.

Parameters: none read (see trimail/authcheck/inbound.py).
"""

from __future__ import annotations

import dataclasses
import functools
import random

from trimail.authcheck.dkimverify import DkimResult
from trimail.authcheck.spf import SpfResult
from trimail.cleanup.headers import header_addresses
from trimail.net.dns import DnsError, Resolver

POLICIES = ("none", "quarantine", "reject")


@functools.cache
def _psl():
    from publicsuffixlist import PublicSuffixList

    return PublicSuffixList()


def organizational_domain(domain: str) -> str:
    """The registered domain of *domain* (RFC 7489 section 3.2), itself when it is a suffix."""
    domain = domain.lower().rstrip(".")
    return _psl().privatesuffix(domain) or domain


@dataclasses.dataclass(frozen=True, slots=True)
class DmarcResult:
    result: str  # pass, fail, none, temperror, permerror
    header_from: str
    policy: str = "none"  # the policy that applies to this message: p= or sp=
    disposition: str = "none"  # what the policy says for this message after pct=
    reason: str = ""


def from_domain(header: bytes | bytearray) -> str | None:
    """The domain of the one From: address in *header*, None when there is not exactly one."""
    address = from_address(header)
    if address is None:
        return None
    return address.rpartition("@")[2].strip().lower().rstrip(".") or None


def from_address(header: bytes | bytearray) -> str | None:
    """The one From: address in *header* (one From: field holding one address with a
    domain part), None otherwise."""
    values = []
    current: list[str] | None = None
    for line in bytes(header).decode("utf-8", "replace").split("\r\n"):
        if line[:1] in (" ", "\t") and current is not None:
            current.append(line)
            continue
        current = None
        name, colon, value = line.partition(":")
        if colon and name.strip().lower() == "from":
            current = [value]
            values.append(current)
    if len(values) != 1:
        return None
    addresses = [a for _, a in header_addresses("".join(values[0])) if a]
    if len(addresses) != 1 or "@" not in addresses[0]:
        return None
    return addresses[0]


def parse_record(text: str) -> dict[str, str] | None:
    """The tags of a DMARC record, None when it is not one (no v=DMARC1 first)."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        name, eq, value = part.partition("=")
        if eq:
            tags.setdefault(name.strip().lower(), value.strip())
    if not text.strip().startswith("v") or tags.get("v") != "DMARC1":
        return None
    return tags


async def _records(resolver: Resolver, domain: str) -> list[dict[str, str]]:
    texts = await resolver.lookup(f"_dmarc.{domain}", "TXT") or []
    return [tags for text in texts if (tags := parse_record(text)) is not None]


def _aligned(domain: str, header_from: str, strict: bool) -> bool:
    domain = domain.lower().rstrip(".")
    if strict:
        return domain == header_from
    return organizational_domain(domain) == organizational_domain(header_from)


async def check_dmarc(resolver: Resolver, header_from: str | None, spf: SpfResult | None,
                      dkims: list[DkimResult]) -> DmarcResult:
    if header_from is None:
        return DmarcResult("permerror", "", reason="not exactly one From: address")
    organizational = organizational_domain(header_from)
    try:
        records = await _records(resolver, header_from)
        inherited = False
        if not records and organizational != header_from:
            records, inherited = await _records(resolver, organizational), True
    except DnsError:
        return DmarcResult("temperror", header_from, reason="policy record unavailable")
    if len(records) != 1:  # none, or several: no DMARC for this domain (section 6.6.3)
        return DmarcResult("none", header_from)
    tags = records[0]
    policy = tags.get("p", "").lower()
    if policy not in POLICIES:
        policy = "none"  # section 6.6.3: an invalid p= with a valid rua= is p=none; without, no record
    if inherited and tags.get("sp", "").lower() in POLICIES:
        policy = tags["sp"].lower()
    spf_ok = spf is not None and spf.result == "pass" and _aligned(
        spf.domain, header_from, tags.get("aspf", "r").lower() == "s")
    dkim_ok = any(d.result == "pass" and _aligned(d.domain, header_from, tags.get("adkim", "r").lower() == "s")
                  for d in dkims)
    if spf_ok or dkim_ok:
        return DmarcResult("pass", header_from, policy)
    try:
        pct = min(100, max(0, int(tags.get("pct", "100"))))
    except ValueError:
        pct = 100
    disposition = policy
    if pct < 100 and random.randrange(100) >= pct:
        disposition = {"reject": "quarantine", "quarantine": "none"}.get(policy, "none")
    return DmarcResult("fail", header_from, policy, disposition, "no aligned identifier")
