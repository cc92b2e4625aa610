"""dns_concurrency_limit: the resolver never has more queries in flight than the
limit (5,000 destinations must not mean 5,000 DNS queries at once)."""

from __future__ import annotations

import socket

import dns.flags
import dns.message
import pytest
import trio

from tests.dnsserver import answer
from trimail.config.values import ListenAddress
from trimail.net.dns import Resolver

DNS_HOST = "127.0.80.5"


class SlowDns:
    """A DNS server that answers each query after *delay* seconds, counting the
    queries it holds at once."""

    def __init__(self, zone: dict, delay: float) -> None:
        self.zone, self.delay = zone, delay
        self.in_flight = 0
        self.most_in_flight = 0
        self.answered = 0

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await sock.bind((DNS_HOST, 0))
        task_status.started(sock.getsockname()[1])
        async with trio.open_nursery() as nursery:
            with sock:
                while True:
                    data, peer = await sock.recvfrom(4096)
                    nursery.start_soon(self._answer, sock, data, peer)

    async def _answer(self, sock, data: bytes, peer) -> None:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await trio.sleep(self.delay)  # a slow name server (not synchronisation)
            await sock.sendto(answer(self.zone, dns.message.from_wire(data)).to_wire(), peer)
            self.answered += 1
        finally:
            self.in_flight -= 1


async def test_resolver_keeps_its_queries_in_flight_under_the_limit(nursery):
    zone = {f"d{i}.example": {"A": ["192.0.2.1"]} for i in range(30)}
    server = SlowDns(zone, delay=0.05)
    port = await nursery.start(server.run)
    resolver = Resolver([ListenAddress(DNS_HOST, port)], concurrency=4)
    found: dict[str, list[str]] = {}

    async def lookup(name: str) -> None:
        found[name] = await resolver.addresses(name)

    with trio.fail_after(20):
        async with trio.open_nursery() as lookups:
            for name in zone:
                lookups.start_soon(lookup, name)
    assert all(found[name] == ["192.0.2.1"] for name in zone)
    print(f"\n{len(zone)} names looked up, at most {server.most_in_flight} queries in flight (limit 4)")
    assert 2 <= server.most_in_flight <= 4


async def test_answers_are_reused_within_their_ttl_not_asked_for_again(nursery):
    """A queue run opens many connections to one destination: its MX and address
    answers come from the resolver's cache for their TTL (60 s here), as from a
    local caching resolver, instead of two more queries per connection."""
    zone = {"busy.example": {"MX": ["10 mx.busy.example."]}, "mx.busy.example": {"A": ["192.0.2.7"]}}
    server = CountingDns(zone, delay=0)
    port = await nursery.start(server.run)
    resolver = Resolver([ListenAddress(DNS_HOST, port)])
    with trio.fail_after(20):
        for _ in range(20):
            hosts = await resolver.mx_hosts("busy.example")
            assert [h.name for h in hosts] == ["mx.busy.example"]
            assert await resolver.lookup("mx.busy.example", "A") == ["192.0.2.7"]
    assert server.asked == {"busy.example": 1, "mx.busy.example": 1}  # one MX query, one A query


async def test_an_answer_with_hundreds_of_records_is_used_but_not_kept(nursery):
    """Red team 39: a wildcard zone answered every MX query with 2,400 records; each
    parsed answer (885 KB) stayed in the cache, and one message to 1,000 of its names
    took the qmgr from 43 MB to 1.2 GB.  A heavy answer is used and asked for again
    next time; a light one is still kept for its TTL."""
    zone = {"heavy.example": {"MX": [f"10 mx{i}.heavy.example." for i in range(400)]},
            "light.example": {"MX": ["10 mx.light.example."]},
            "stuffed.example": {"TXT": [f'"{i:02d}' + "v" * 200 + '"' for i in range(30)]}}
    server = CountingDns(zone, delay=0)
    port = await nursery.start(server.run)
    resolver = Resolver([ListenAddress(DNS_HOST, port)])
    with trio.fail_after(20):
        for _ in range(3):
            assert len(await resolver.mx_hosts("heavy.example")) == 400
            assert [h.name for h in await resolver.mx_hosts("light.example")] == ["mx.light.example"]
            assert len(await resolver.lookup("stuffed.example", "TXT")) == 30
    assert server.asked == {"heavy.example": 3, "light.example": 1, "stuffed.example": 3}


class CountingDns(SlowDns):
    """SlowDns that counts the queries per name as they come (``answered`` is
    counted after the answer is sent, when the resolver may have read it already)."""

    asked: dict[str, int]

    async def _answer(self, sock, data: bytes, peer) -> None:
        name = dns.message.from_wire(data).question[0].name.to_text(omit_final_dot=True)
        self.asked = getattr(self, "asked", {})
        self.asked[name] = self.asked.get(name, 0) + 1
        await super()._answer(sock, data, peer)


async def test_an_mx_set_of_numeric_exchanges_is_one_warning_per_lookup_not_one_per_record(nursery, caplog):
    """Red team 39: each MX record whose exchange is no host name was a warning line of
    its own, all of them before MX_HOST_LIMIT applied: a zone of 1,000 such records wrote
    1,000 lines to the mail log per lookup (a wildcard zone: per recipient domain)."""
    zone = {"flood.example": {"MX": [f"10 192.0.2.{i % 250}." if i % 2 else f"10 -bad{i}-.flood.example."
                                     for i in range(1000)] + ["20 mx.flood.example."]}}
    port = await nursery.start(SlowDns(zone, delay=0).run)
    resolver = Resolver([ListenAddress(DNS_HOST, port)])
    with caplog.at_level("WARNING", logger="trimail.smtp"), trio.fail_after(20):
        hosts = await resolver.mx_hosts("flood.example")
    assert [h.name for h in hosts] == ["mx.flood.example"]
    lines = [r.getMessage() for r in caplog.records if "resource data of MX record" in r.getMessage()]
    assert len(lines) == 1, len(lines)
    assert "flood.example" in lines[0] and "(and 624 more)" in lines[0]  # 625 distinct bad records


class TruncatingDns:
    """A name server that answers every query over UDP with TC set and nothing else,
    and over TCP with the whole answer (as a server does for an answer over 512
    octets); ``datagram`` names whose whole answer it sends over UDP instead, TC or
    not (a hostile server)."""

    def __init__(self, zone: dict, datagram: frozenset[str] = frozenset()) -> None:
        self.zone, self.datagram = zone, datagram
        self.tcp_answers: list[str] = []

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await sock.bind((DNS_HOST, 0))
        port = sock.getsockname()[1]
        listeners = await trio.open_tcp_listeners(port, host=DNS_HOST)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self._tcp, listeners)
            task_status.started(port)
            with sock:
                while True:
                    data, peer = await sock.recvfrom(4096)
                    query = dns.message.from_wire(data)
                    response = answer(self.zone, query)
                    if query.question[0].name.to_text(omit_final_dot=True) not in self.datagram:
                        response.answer.clear()
                        response.flags |= dns.flags.TC
                    await sock.sendto(response.to_wire(), peer)

    async def _tcp(self, stream: trio.SocketStream) -> None:
        data = b""
        while len(data) < 2 or len(data) < 2 + int.from_bytes(data[:2], "big"):
            chunk = await stream.receive_some()
            if not chunk:
                return
            data += chunk
        query = dns.message.from_wire(data[2:])
        self.tcp_answers.append(query.question[0].name.to_text(omit_final_dot=True))
        wire = answer(self.zone, query).to_wire()
        await stream.send_all(len(wire).to_bytes(2, "big") + wire)
        await stream.aclose()


async def test_an_answer_over_the_limit_is_never_parsed_by_udp_or_tcp(nursery):
    """Red team 39: a wildcard zone's 52 KB MX answers (2,400 records) cost the qmgr's
    event loop 0.16 s each to parse, and one message to 1,000 of its names held good
    mail for 4 minutes.  An answer over ANSWER_LIMIT is a temporary failure, over TCP
    at once (FormError), over UDP when the datagram is dropped; a truncated answer
    under the limit still comes over TCP."""
    from trimail.net.dns import DnsTemporary

    huge = [f"10 mx{i}.wild.example." for i in range(2400)]
    zone = {"huge.example": {"MX": huge}, "shouted.example": {"MX": huge},
            "fair.example": {"MX": [f"10 mx{i}.fair.example." for i in range(300)]}}
    server = TruncatingDns(zone, datagram=frozenset({"shouted.example"}))
    port = await nursery.start(server.run)
    assert len(answer(zone, dns.message.make_query("huge.example", "MX")).to_wire()) > 50_000
    resolver = Resolver([ListenAddress(DNS_HOST, port)], lifetime=2)
    with trio.fail_after(20):
        assert len(await resolver.mx_hosts("fair.example")) == 300  # by TCP, under the limit
        started = trio.current_time()
        with pytest.raises(DnsTemporary):
            await resolver.mx_hosts("huge.example")
        assert trio.current_time() - started < 1  # the length said it: no read, no wait
        with pytest.raises(DnsTemporary):
            await resolver.mx_hosts("shouted.example")
    assert server.tcp_answers == ["fair.example", "huge.example"]


class SilentFor(SlowDns):
    """SlowDns that never answers the names in *silent* (a zone whose servers are gone)."""

    def __init__(self, zone: dict, silent: set[str]) -> None:
        super().__init__(zone, delay=0)
        self.silent = silent

    async def _answer(self, sock, data: bytes, peer) -> None:
        if dns.message.from_wire(data).question[0].name.to_text(omit_final_dot=True) in self.silent:
            self.in_flight += 1  # held for good
            return
        await super()._answer(sock, data, peer)


async def test_a_cached_answer_does_not_wait_for_a_turn_behind_a_silent_zone(nursery):
    """Red team 39: one message to 1,000 names of a zone that never answers filled every
    dns_concurrency_limit turn for their lifetime, and a destination whose answers were
    in the cache waited for a turn all the same.  An answer from the cache takes no turn."""
    zone = {"good.example": {"MX": ["10 mx.good.example."]}, "mx.good.example": {"A": ["192.0.2.9"]}}
    server = SilentFor(zone, {"gone.example"})
    port = await nursery.start(server.run)
    resolver = Resolver([ListenAddress(DNS_HOST, port)], concurrency=1)
    with trio.fail_after(20):
        assert [h.name for h in await resolver.mx_hosts("good.example")] == ["mx.good.example"]
    nursery.start_soon(resolver.mx_hosts, "gone.example")  # holds the only turn for its lifetime
    with trio.fail_after(5):
        while server.in_flight < 1:
            await trio.sleep(0.01)  # (polling the server's count with a deadline)
    with trio.fail_after(2):  # the lookup's lifetime is 10 s: it must not wait for the turn
        assert [h.name for h in await resolver.mx_hosts("good.example")] == ["mx.good.example"]


class SilentZone(SlowDns):
    """SlowDns that never answers any name under *zone* (a silent wildcard zone)."""

    def __init__(self, zone: dict, silent: str) -> None:
        super().__init__(zone, delay=0)
        self.silent = silent

    async def _answer(self, sock, data: bytes, peer) -> None:
        if dns.message.from_wire(data).question[0].name.to_text(omit_final_dot=True).endswith("." + self.silent):
            self.in_flight += 1  # held for good
            return
        await super()._answer(sock, data, peer)


async def test_a_silent_zone_cannot_take_every_turn_from_another_zones_lookups(nursery):
    """Red team 39's lead: one message to 1,000 names of a zone that never answers
    took every dns_concurrency_limit turn for their lifetime, and a healthy
    destination's first (uncached) MX lookup waited behind all of them.  The turns
    are shared out by zone: the silent zone's lookups keep off the last quarter."""
    zone = {"good.example": {"MX": ["10 mx.good.example."]}, "mx.good.example": {"A": ["192.0.2.9"]}}
    server = SilentZone(zone, "silent.example")
    port = await nursery.start(server.run)
    resolver = Resolver([ListenAddress(DNS_HOST, port)], concurrency=4)
    for i in range(12):
        nursery.start_soon(resolver.mx_hosts, f"d{i}.silent.example")
    with trio.fail_after(5):
        while server.in_flight < 3:
            await trio.sleep(0.01)  # (polling the server's count with a deadline)
    with trio.fail_after(2):  # the silent lookups' lifetime is 10 s: no waiting for one of their turns
        assert [h.name for h in await resolver.mx_hosts("good.example")] == ["mx.good.example"]
        assert await resolver.addresses("mx.good.example") == ["192.0.2.9"]
