"""Which addresses one delivery attempt may try, in which order (Postfix's smtp_addr.c
and the address loop of smtp_connect.c).

``Targets`` walks the mail hosts of a destination (its MX hosts by preference, or the
one host of ``[host]``) one preference group at a time, looks up the addresses of a
group only when the better groups gave no session, and yields ``Target``s:

- **Fan-out bound** (``smtp_mx_address_limit``, default 5, 0 = no limit): at most
  that many addresses are tried per delivery attempt, counted as Postfix counts them
  (an address whose connection or greeting failed counts; the same address again in
  clear after a failed TLS handshake does not).  Host lookups stop as soon as the
  addresses found fill what is left of the limit, and at most ``MX_HOST_LIMIT``
  MX hosts are considered (Postfix's dns_rr_list_limit), so a zone with 300 MX
  records costs at most 5 connections and a bounded number of lookups.
- **Loops** (only when the port is 25, as in Postfix, or the address and port are one
  of our own listeners): when an address of a group is this host, the list is cut at
  that preference (we are an MX of the destination: only better MX hosts may be
  tried).  If nothing is left, the attempt fails with ``5.4.6 mail for X loops back to
  myself`` when we are the best MX, else ``4.4.4 unable to find primary relay for X``
  (Postfix's texts and codes).
- ``failure`` says why nothing (more) could be tried: the last lookup failure, or
  the loop; the caller combines it with connection failures.
- ``skip``: addresses to pass over (a backup session of the same attempt never goes
  back to a host it already had a session with).
- **DNS first** (``prepare``): the lookups made before the first address is
  yielded can be made on their own, before any connection: a delivery worker makes
  them (``Connector.lookup``) before it takes a delivery agent's slot.
- **Failed lookups are bounded** (``DNS_FAILURE_TIME_LIMIT``): once the attempt's
  failed address lookups have taken 30 s, no more mail hosts are looked up.

"This host" is decided by the caller's ``is_self(address)``; see
``trimail.delivery.interfaces`` and ``Connector``.

Parameters: smtp_mx_address_limit.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Iterator

import trio

from trimail.delivery.outcome import Outcome, bounced, deferred
from trimail.net.dns import DnsError, DnsPermanent, MailHost, Resolver

MX_HOST_LIMIT = 100
# Seconds the failed address lookups of one attempt may take before it looks up no
# more of its mail hosts (it tries the addresses found so far).  Postfix has no such
# bound: smtp_addr_list looks up every MX host (at most dns_rr_list_limit, 100), each
# with the resolver's own timeouts, and only daemon_timeout (18000 s) ends a process
# stuck longer.  Without it, 100 MX hosts whose address lookups never answer (A and
# AAAA, 10 s each) kept one attempt looking up for 2,000 s.  Lookups that answer are
# not counted (a lookup's wait for a dns_concurrency_limit turn is, when it fails).
DNS_FAILURE_TIME_LIMIT = 30.0

log = logging.getLogger("trimail.smtp")


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    host: str
    address: str
    best: bool  # in the destination's best preference group (a loop found there bounces)


def dns_outcome(exc: DnsError) -> Outcome:
    return bounced(exc.dsn, exc.text) if isinstance(exc, DnsPermanent) else deferred(exc.dsn, exc.text)


class Targets:
    def __init__(self, resolver: Resolver, nexthop: str, hosts: list[MailHost], *,
                 is_self: Callable[[str], bool], address_limit: int,
                 skip: frozenset[str] = frozenset()) -> None:
        self.resolver = resolver
        self.nexthop = nexthop
        if len(hosts) > MX_HOST_LIMIT:
            log.warning("%s: %d MX records, using the best %d", nexthop, len(hosts), MX_HOST_LIMIT)
        self.hosts = hosts[:MX_HOST_LIMIT]
        self.is_self = is_self
        self.address_limit = address_limit
        self.skip = skip  # addresses this attempt already had a session with (never yielded, not counted)
        self.failure: Outcome | None = None
        self.loop = False  # the attempt ends in a loop verdict: try no fall-back either
        self.tried = 0  # addresses yielded (the caller un-counts a retry in clear)
        self.failed_for = 0.0  # seconds the failed address lookups took (DNS_FAILURE_TIME_LIMIT)
        self._groups: Iterator[tuple[int, Iterator[MailHost]]] = itertools.groupby(
            self.hosts, key=lambda host: host.preference)
        self._first: tuple[int, list[tuple[str, str]]] | None = None  # looked up by prepare()
        self._ready = False  # prepare() looked up self._first, not yet taken by the iteration

    def _room(self) -> int | None:
        return None if self.address_limit <= 0 else self.address_limit - self.tried

    async def prepare(self) -> None:
        """Make the lookups that come before the first address is yielded (those of the
        best preference group that has an address), now: the delivery worker makes
        them before it takes a delivery agent's slot, so a destination whose DNS does
        not answer waits without one."""
        if not self._ready:
            self._first, self._ready = await self._next_group(), True

    async def _next_group(self) -> tuple[int, list[tuple[str, str]]] | None:
        """The next preference group that has addresses, and its (host, address) pairs;
        None when no group is left, the room is full, or the failed lookups took
        DNS_FAILURE_TIME_LIMIT."""
        for pref, group in self._groups:
            room = self._room()
            if room is not None and room <= 0:
                return None
            resolved: list[tuple[str, str]] = []
            for host in group:
                if room is not None and sum(a not in self.skip for _, a in resolved) >= room:
                    break
                if self.failed_for >= DNS_FAILURE_TIME_LIMIT:
                    log.info("%s: address lookups of its mail hosts failed for %.0f s: looking up no more",
                             self.nexthop, self.failed_for)
                    self._groups = iter(())  # (the addresses found so far are still tried)
                    return (pref, resolved) if resolved else None
                started = trio.current_time()
                try:
                    addresses = await self.resolver.addresses(host.name)
                except DnsError as exc:
                    self.failure = dns_outcome(exc)
                    self.failed_for += trio.current_time() - started
                    continue
                resolved += [(host.name, address) for address in addresses]
            if resolved:
                return pref, resolved
        return None

    async def __aiter__(self) -> AsyncIterator[Target]:
        best_pref = self.hosts[0].preference if self.hosts else 0
        found_any = False
        while True:
            if self._ready:
                found, self._first, self._ready = self._first, None, False
            else:
                found = await self._next_group()
            if found is None:
                return
            pref, resolved = found
            if any(self.is_self(address) for _, address in resolved):
                # we are an MX host of this destination at this preference: never hand
                # the mail to an equal or worse one (smtp_truncate_self)
                if not found_any:
                    self.loop = True
                    if pref == best_pref:
                        self.failure = bounced("5.4.6", f"mail for {self.nexthop} loops back to myself")
                    else:
                        self.failure = deferred("4.4.4", f"unable to find primary relay for {self.nexthop}")
                return
            found_any = True
            for name, address in resolved:
                if address in self.skip:
                    continue
                room = self._room()
                if room is not None and room <= 0:
                    return
                self.tried += 1
                yield Target(name, address, pref == best_pref)
