"""MX and address lookups with dnspython's async resolver on trio.

``mx_hosts(domain)`` gives the hosts to try, in preference order with random
order among equal preferences (RFC 5321 section 5.1).  A domain without MX
records is its own mail host (implicit MX).  Permanent answers raise
``DnsPermanent`` (NXDOMAIN: 5.1.2; null MX ``0 .``, RFC 7505: 5.1.10);
SERVFAIL, refusal and timeouts raise ``DnsTemporary`` (4.4.3), so the mail is
deferred, never bounced, when DNS is sick.  An MX record whose exchange is an IP
address or no host name at all is skipped with a warning (never connected to); a
domain whose MX records are all like that is deferred, 4.4.4 "malformed MX record".

This is the edge of dnspython: no dnspython exception leaves this module.  A
name dnspython cannot express (a label over 63 octets, a name over 255 octets
in wire form, an empty label, a U-label IDNA cannot encode) is ``DnsPermanent``
5.1.2 ("bad destination host name") before any query is sent; any other
``DNSException``, ``ValueError`` or ``UnicodeError`` from a lookup is
``DnsTemporary`` 4.4.3, so a surprise costs one delivery attempt or one
restriction, never the daemon.  ``DnsError`` is an ``errors.LookupFailure``.

Answers are cached for their TTL (at most ``CACHE_SIZE``, least recently used
first), as a local caching resolver would, so a queue run does not repeat the
MX and address lookups of every new connection to the same destination.  A heavy
answer (more than ``CACHED_RECORDS_LIMIT`` records in all its sections, or TXT
strings over ``CACHED_TEXT_LIMIT`` octets) is used and not kept: dnspython keeps
the whole parsed response with an answer, about 370 bytes a record, and an
expired entry leaves the cache only when it is asked for again or pushed out.

An answer is bounded before dnspython parses it (``Bounded``): a datagram over
``ANSWER_LIMIT`` octets is dropped as a stray one (we send no EDNS, so a server
keeps to 512 and sets TC), and a TCP answer whose length is over it ends the query
at that server (``FormError``, a temporary failure).  dnspython parses an answer on the event loop, about 3 ms per KiB of MX
records here: a wildcard zone's 52 KB answers (2,400 records, 0.16 s each) for
1,000 recipient domains held every delivery of the qmgr for minutes.

Parameters: dns_nameservers (resolvers to ask instead of /etc/resolv.conf),
dns_concurrency_limit (most queries in flight at once, per resolver; the others
wait for a turn, shared out by zone: ``dnsturns.Turns``; an answer from the cache
takes none).
"""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import logging
import os
import random
import re
import socket
import time

import dns.asyncbackend
import dns.asyncquery
import dns.asyncresolver
import dns.exception
import dns.inet
import dns.name
import dns.nameserver
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.reversename
import trio

from trimail.config.values import ListenAddress
from trimail.errors import LookupFailure
from trimail.log import printable
from trimail.net.dnsturns import Turns, zone_of

DEFAULT_LIFETIME = 10.0
DEFAULT_CONCURRENCY = 100  # dns_concurrency_limit's default
CACHE_SIZE = 10_000  # answers kept (each for its TTL; the least recently used goes first)
# an answer heavier than this is not kept (red team 39: a wildcard zone answering
# every MX query with 2,400 records, 885 KB each once parsed, took the qmgr from
# 43 MB to 1.2 GB with one message to 1,000 of its names; 10,000 would be 8.6 GB)
CACHED_RECORDS_LIMIT = 32
CACHED_TEXT_LIMIT = 4096
ANSWER_LIMIT = 16384  # octets of an answer taken, by UDP or TCP; a bigger one is never parsed

RESOLV_CONF = "/etc/resolv.conf"

log = logging.getLogger("trimail.smtp")


class DnsError(LookupFailure):
    """A DNS answer that is not records: ``dsn`` is the RFC 3463 status and
    ``text`` the reason (Postfix's wording) for the log, the DSN or the reply."""

    permanent = False

    def __init__(self, dsn: str, text: str) -> None:
        super().__init__(text, temporary=not self.permanent, dsn=dsn)
        self.text = text


class DnsPermanent(DnsError):
    permanent = True


class DnsTemporary(DnsError):
    pass


def to_name(name: str) -> dns.name.Name:
    """*name* as a dnspython name; DnsPermanent 5.1.2 when it cannot be one."""
    try:
        return dns.name.from_text(name)
    except (dns.exception.DNSException, ValueError, UnicodeError) as exc:
        raise DnsPermanent("5.1.2", f"bad destination host name: Name service error for "
                           f"name={printable(name, 300)}: invalid host or domain name "
                           f"({type(exc).__name__})") from None


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def _exchange_gripe(name: str) -> str | None:
    """Why an MX exchange is no host name, or None when it is one: an IP address
    (``10 192.0.2.1.``, which Postfix uses with a "numeric domain name" warning but
    RFC 5321 section 5.1 forbids) or anything else a host name cannot be (Postfix's
    valid_hostname: the record is dropped).  Such a record is skipped and never
    connected to; a domain with nothing else is deferred."""
    try:
        ipaddress.ip_address(name.strip("[]"))
        return "numeric domain name"
    except ValueError:
        labels = name.split(".")
        if len(name) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in labels):
            return None
        return "malformed domain name"


@dataclasses.dataclass(frozen=True, slots=True)
class MailHost:
    name: str
    preference: int


class _LimitedSocket:
    """A dnspython socket that gives dnspython no answer over *limit* octets: a bigger
    datagram is dropped as a stray one would be (within the same deadline), a TCP
    answer whose two-octet length says more is a FormError before it is read."""

    def __init__(self, sock, limit: int) -> None:  # type: ignore[no-untyped-def]
        self._sock, self._limit, self._head = sock, limit, b""

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self._sock, name)

    async def recvfrom(self, size: int, timeout: float | None):  # type: ignore[no-untyped-def]
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            data, address = await self._sock.recvfrom(size, left)
            if len(data) <= self._limit:
                return data, address

    async def recv(self, size: int, timeout: float | None) -> bytes:
        data = await self._sock.recv(size, timeout)
        if len(self._head) < 2:
            self._head += data[:2 - len(self._head)]
            if len(self._head) == 2 and int.from_bytes(self._head, "big") > self._limit:
                raise dns.exception.FormError(f"a DNS answer of {int.from_bytes(self._head, 'big')} octets "
                                              f"(the limit is {self._limit})")
        return data


class Bounded(dns.nameserver.Do53Nameserver):
    """A name server over UDP, and TCP for a truncated answer, as dnspython's own,
    whose answers are bounded (ANSWER_LIMIT) before they are
    parsed.  (No source address: trimail never asks for one.)"""

    async def async_query(self, request, timeout, source, source_port, max_size, backend,  # type: ignore[no-untyped-def]
                          one_rr_per_rrset=False, ignore_trailing=False):
        af = dns.inet.af_for_address(self.address)
        if max_size:  # TCP
            sock = await backend.make_socket(af, socket.SOCK_STREAM, 0, None, (self.address, self.port), timeout)
        else:
            sock = await backend.make_socket(af, socket.SOCK_DGRAM, 0, None, (self.address, self.port)
                                             if backend.datagram_connection_required() else None)
        async with sock:
            if max_size:
                return await dns.asyncquery.tcp(request, self.address, timeout, self.port,
                                                one_rr_per_rrset=one_rr_per_rrset, ignore_trailing=ignore_trailing,
                                                sock=_LimitedSocket(sock, ANSWER_LIMIT))
            return await dns.asyncquery.udp(request, self.address, timeout, self.port, ignore_unexpected=True,
                                            one_rr_per_rrset=one_rr_per_rrset, ignore_trailing=ignore_trailing,
                                            raise_on_truncation=True, ignore_errors=True,
                                            sock=_LimitedSocket(sock, ANSWER_LIMIT))


def bounded(nameservers, ports: dict[str, int], port: int) -> list:  # type: ignore[no-untyped-def]
    """*nameservers* (addresses or dnspython's name servers) as Bounded ones; others
    (DNS over HTTPS in a resolv.conf) as they are."""
    found = []
    for ns in dns.asyncresolver.Resolver._enrich_nameservers(list(nameservers), ports, port):
        found.append(Bounded(ns.address, ns.port) if type(ns) is dns.nameserver.Do53Nameserver else ns)
    return found


class BoundedCache(dns.resolver.LRUCache):
    """dnspython's LRU cache, which keeps only answers of modest weight (see the
    module's docstring): the rest are used once and asked for again next time."""

    def put(self, key, value) -> None:  # type: ignore[no-untyped-def]
        if not heavy(value):
            super().put(key, value)


def heavy(answer: object) -> bool:
    """Does *answer*'s response hold more than CACHED_RECORDS_LIMIT records in its
    sections, or TXT strings longer than CACHED_TEXT_LIMIT together?"""
    response = getattr(answer, "response", None)
    if response is None:
        return False
    records = text = 0
    for section in (response.answer, response.authority, response.additional):
        for rrset in section:
            records += len(rrset)
            if records > CACHED_RECORDS_LIMIT:
                return True
            if rrset.rdtype == dns.rdatatype.TXT:
                text += sum(len(string) for rdata in rrset for string in rdata.strings)
    return text > CACHED_TEXT_LIMIT


_system: tuple[tuple[int, int, int] | None, dns.asyncresolver.Resolver] | None = None  # resolv.conf's identity, parsed


def _system_resolver() -> dns.asyncresolver.Resolver:
    """A resolver configured from /etc/resolv.conf (127.0.0.1 when there is none or it
    is bad, e.g. in a chroot), parsed again only when the file changed: every start
    and reload makes two, and a test MTA starts in milliseconds."""
    global _system
    try:
        stat = os.stat(RESOLV_CONF)
        identity: tuple[int, int, int] | None = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
    except OSError:
        identity = None
    if _system is None or identity is None or _system[0] != identity:
        try:
            template = dns.asyncresolver.Resolver(filename=RESOLV_CONF)
        except (dns.exception.DNSException, OSError, ValueError):  # no or bad resolv.conf
            template = dns.asyncresolver.Resolver(configure=False)
            template.nameservers = ["127.0.0.1"]
        _system = (identity, template)
    return copy.copy(_system[1])  # each its own attributes (lifetime, cache); the lists are never changed


class Resolver:
    """dnspython's async resolver on trio, at most *concurrency* queries in flight
    (``dns_concurrency_limit``): a queue run to thousands of destinations, or a
    flood of clients checked against RBLs, waits for a turn instead of sending
    thousands of queries (and opening as many sockets) at once."""

    def __init__(self, nameservers: list[ListenAddress] | None = None, lifetime: float = DEFAULT_LIFETIME,
                 concurrency: int = DEFAULT_CONCURRENCY) -> None:
        self._turns = Turns(concurrency)  # round-robin by zone: a silent one cannot take them all
        self._nameservers = list(nameservers or ())
        self._lifetime = lifetime
        self._dns: dns.asyncresolver.Resolver | None = None  # made at the first query (_resolver)
        self._backend = dns.asyncbackend.get_backend("trio")

    @property
    def _resolver(self) -> dns.asyncresolver.Resolver:
        """dnspython's resolver, made at the first query: every start makes two
        Resolvers, and a test MTA that captures mail may never ask anything."""
        if self._dns is None:
            if self._nameservers:
                resolver = dns.asyncresolver.Resolver(configure=False)
                resolver.nameservers = [Bounded(ns.host, ns.port) for ns in self._nameservers]
            else:
                resolver = _system_resolver()
                resolver.nameservers = bounded(resolver.nameservers, resolver.nameserver_ports, resolver.port)
            resolver.lifetime = self._lifetime
            resolver.timeout = min(self._lifetime, 3.0)
            resolver.retry_servfail = False
            # answers are kept for their TTL (dnspython's LRU cache, bounded): a queue
            # run does not ask again for every new connection to the same destination
            resolver.cache = BoundedCache(CACHE_SIZE)  # (heavy answers are not kept)
            self._dns = resolver
        return self._dns

    async def _query(self, name: str, rdtype: str) -> dns.resolver.Answer | None:
        """The answer, or None for "no records of this type"; raises DnsError and
        nothing else (cancellation aside)."""
        qname = to_name(name)
        resolver = self._resolver
        try:
            if resolver.cache.get((qname, dns.rdatatype.from_text(rdtype), dns.rdataclass.IN)) is not None:
                # answered from the cache: no turn to wait for (red team 39: behind a zone
                # that never answers, even a cached answer waited for dns_concurrency_limit);
                # still a checkpoint, as the turn was, so a round of cached lookups lets others run
                await trio.lowlevel.checkpoint()
                return await resolver.resolve(qname, rdtype, backend=self._backend, search=False)
            async with self._turns.turn(zone_of(name)):  # the wait for a turn counts against the caller's deadline
                return await resolver.resolve(qname, rdtype, backend=self._backend, search=False)
        except dns.resolver.NXDOMAIN:
            raise DnsPermanent("5.1.2", f"Host or domain name not found. Name service error for "
                               f"name={name} type={rdtype}: Host not found") from None
        except dns.resolver.NoAnswer:
            return None
        except (dns.exception.DNSException, OSError, ValueError, UnicodeError) as exc:
            # SERVFAIL, refusal, timeouts, YXDOMAIN, a malformed answer, a name made
            # too long by a CNAME: all of them worth another try later, none fatal
            raise DnsTemporary("4.4.3", f"Host or domain name not found. Name service error for "
                               f"name={name} type={rdtype}: Host not found, try again") from exc

    async def mx_hosts(self, domain: str) -> list[MailHost]:
        answer = await self._query(domain, "MX")
        if answer is None:
            return [MailHost(domain, 0)]
        try:
            records = [(r.preference, r.exchange.to_text(omit_final_dot=True)) for r in answer]
        except (dns.exception.DNSException, ValueError, UnicodeError, AttributeError) as exc:
            raise DnsTemporary("4.4.3", f"Malformed or unexpected name server reply for name={domain} "
                               "type=MX") from exc
        if any(name in ("", ".") for _, name in records) or any(str(r.exchange) == "." for r in answer):
            raise DnsPermanent("5.1.10", f"Domain {domain} does not accept mail (nullMX)")
        usable, bad = [], []
        for pref, name in records:
            gripe = _exchange_gripe(name)
            if gripe is None:
                usable.append((pref, name))
            else:
                bad.append((gripe, name))
        if bad:  # one line per lookup (red team 39: a line per record, 1,000 for one answer)
            gripe, name = bad[0]
            log.warning("%s in resource data of MX record for %s: %s%s", gripe, printable(domain, 300),
                        printable(name, 100), f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
        if not usable:
            name = records[0][1]
            raise DnsTemporary("4.4.4", f"malformed MX record for {printable(domain, 300)}: "
                               f"{printable(name, 100)} is not a host name (RFC 5321 section 5.1)")
        records = usable
        random.shuffle(records)
        records.sort(key=lambda record: record[0])  # stable: random order among equals
        return [MailHost(name.lower(), pref) for pref, name in records]

    async def lookup(self, name: str, rdtype: str) -> list[str] | None:
        """Records of one type as text; None when the name does not exist (NXDOMAIN),
        [] when it exists without such records.  Temporary trouble raises DnsTemporary."""
        try:
            answer = await self._query(name, rdtype)
        except DnsPermanent:
            return None
        if answer is None:
            return []
        try:
            if rdtype == "TXT":
                return [b"".join(r.strings).decode("utf-8", "replace") for r in answer]
            return [r.to_text() for r in answer]
        except (dns.exception.DNSException, ValueError, UnicodeError, AttributeError) as exc:
            raise DnsTemporary("4.4.3", f"Malformed or unexpected name server reply for name={name} "
                               f"type={rdtype}") from exc

    async def reverse(self, address: str) -> list[str] | None:
        """PTR names of an IP address (None: no PTR record at all, or not an IP address)."""
        try:
            name = dns.reversename.from_address(address).to_text(omit_final_dot=True)
        except (dns.exception.DNSException, ValueError, UnicodeError):
            return None
        names = await self.lookup(name, "PTR")
        if not names:
            return None
        return [n.rstrip(".").lower() for n in names]

    async def addresses(self, host: str) -> list[str]:
        """IPv4 then IPv6 addresses of *host*; raises DnsError when there are none."""
        try:
            return [str(ipaddress.ip_address(host))]
        except ValueError:
            pass
        to_name(host)  # a name DNS cannot express says so (5.1.2), not "host not found"
        found: list[str] = []
        temporary: DnsError | None = None
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self._query(host, rdtype)
            except DnsPermanent:
                break
            except DnsTemporary as exc:
                temporary = exc
                continue
            if answer is not None:
                found += [str(r.address) for r in answer]
        if found:
            return found
        if temporary is not None:
            raise temporary
        raise DnsPermanent("5.4.4", f"Host or domain name not found. Name service error for name={host} "
                           "type=A: Host not found")
