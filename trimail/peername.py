"""The client's verified host name for the log, ``Received:`` and reject texts
(Postfix's ``smtpd_peername_lookup``): reverse lookup, then forward confirmation.

Postfix's smtpd looks the client up before its greeting and uses ``name[addr]``
everywhere, ``unknown[addr]`` when the PTR name does not resolve back to the
address.  trimail does the same through the serve's trio resolver
(``dns_nameservers``), with two bounds so that slow DNS costs no latency worth
speaking of: a session waits at most ``LOOKUP_TIMEOUT`` seconds (then it is
``unknown``), and answers are cached per address (``POSITIVE_TTL`` for a name,
``NEGATIVE_TTL`` for none or a timeout; at most ``CACHE_SIZE`` addresses), so a
client that connects again, or many sessions from one address at once, share one
lookup.  ``smtpd_peername_lookup = no`` skips it: every client is ``unknown``.

A temporary DNS failure gives ``unknown`` too (Postfix distinguishes it for
``reject_unknown_client_hostname``, which keeps doing its own lookup with its
temporary-failure answer in ``trimail/policy``).

Parameters: smtpd_peername_lookup, dns_nameservers (through the resolver).
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict

import trio

from trimail.net.dns import DnsError, Resolver
from trimail.smtp.address import is_domain

LOOKUP_TIMEOUT = 2.0
POSITIVE_TTL = 3600.0
NEGATIVE_TTL = 60.0
CACHE_SIZE = 10_000
UNKNOWN = "unknown"


class PeerNames:
    """Verified client names, cached; one lookup at a time per address."""

    def __init__(self, timeout: float = LOOKUP_TIMEOUT) -> None:
        self.timeout = timeout
        self._cache: OrderedDict[str, tuple[str, float]] = OrderedDict()  # address -> (name, expires)
        self._pending: dict[str, trio.Event] = {}

    async def name(self, resolver: Resolver, address: str) -> str:
        """The forward-confirmed name of *address*, or ``unknown`` (also past the timeout)."""
        while True:
            cached = self._cached(address)
            if cached is not None:
                return cached
            waiting = self._pending.get(address)
            if waiting is None:
                break
            with trio.move_on_after(self.timeout):
                await waiting.wait()
                continue
            return UNKNOWN
        done = self._pending[address] = trio.Event()
        name = UNKNOWN
        try:
            with trio.move_on_after(self.timeout):
                name = await verified_name(resolver, address)
        finally:
            self._store(address, name)
            del self._pending[address]
            done.set()
        return name

    def _cached(self, address: str) -> str | None:
        entry = self._cache.get(address)
        if entry is None:
            return None
        if entry[1] < time.monotonic():
            del self._cache[address]
            return None
        return entry[0]

    def _store(self, address: str, name: str) -> None:
        ttl = NEGATIVE_TTL if name == UNKNOWN else POSITIVE_TTL
        self._cache[address] = (name, time.monotonic() + ttl)
        self._cache.move_to_end(address)
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)


def host_name(name: str) -> bool:
    """A name that may stand for a client in the log, ``Received:`` and reply texts:
    letters, digits and hyphens in dot-separated labels (nothing dnspython had to
    escape, no brackets or spaces), and not an address (Postfix refuses a numeric
    PTR name: it could pass for another client)."""
    name = name.rstrip(".")
    if not name or name.startswith("[") or not is_domain(name):
        return False
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return not name.replace(".", "").isdigit()
    return False


async def verified_name(resolver: Resolver, address: str) -> str:
    """The first PTR name of *address* whose A/AAAA records include it, else ``unknown``."""
    try:
        names = await resolver.reverse(address)
    except DnsError:
        return UNKNOWN
    for name in names or ():
        if not host_name(name):  # Postfix's sockaddr_to_hostname: no valid_hostname(), or numeric
            continue
        try:
            if address in await resolver.addresses(name):
                return name
        except DnsError:
            continue
    return UNKNOWN
