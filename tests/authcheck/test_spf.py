"""SPF (RFC 7208) against a real DNS server on loopback: every result, the
mechanisms, macros and the lookup limits.

Loopback addresses of this test module: the DNS server on 127.0.47.2; the
"client" addresses checked are 192.0.2.0/24 documentation addresses (never
connected to)."""

from __future__ import annotations

import pytest

from tests.dnsserver import run_dns_server
from trimail.authcheck.spf import check_spf
from trimail.config.values import ListenAddress
from trimail.net.dns import Resolver

ZONE: dict = {
    "pass.example": {"TXT": ['"v=spf1 ip4:192.0.2.0/24 -all"']},
    "fail.example": {"TXT": ['"v=spf1 ip4:198.51.100.1 -all"']},
    "soft.example": {"TXT": ['"v=spf1 ~all"']},
    "neutral.example": {"TXT": ['"v=spf1 ?all"']},
    "nothing.example": {"TXT": ['"some other record"']},
    "two.example": {"TXT": ['"v=spf1 -all"', '"v=spf1 +all"']},
    "broken.example": {"TXT": ['"v=spf1 ip4:192.0.2.1 frobnicate -all"']},
    "badcidr.example": {"TXT": ['"v=spf1 ip4:192.0.2.1/33 -all"']},
    "sick.example": "SERVFAIL",
    "incsick.example": {"TXT": ['"v=spf1 include:sick.example -all"']},
    "a.example": {"TXT": ['"v=spf1 a -all"'], "A": ["192.0.2.10"]},
    "acidr.example": {"TXT": ['"v=spf1 a:host.acidr.example/28 -all"']},
    "host.acidr.example": {"A": ["192.0.2.1"]},
    "mx.example": {"TXT": ['"v=spf1 mx -all"'], "MX": ["10 mail.mx.example."]},
    "mail.mx.example": {"A": ["192.0.2.20"]},
    "inc.example": {"TXT": ['"v=spf1 include:pass.example -all"']},
    "incnone.example": {"TXT": ['"v=spf1 include:nothing.example -all"']},
    "redir.example": {"TXT": ['"v=spf1 redirect=pass.example"']},
    "redirnone.example": {"TXT": ['"v=spf1 redirect=nothing.example"']},
    "exists.example": {"TXT": ['"v=spf1 exists:%{ir}.%{l2r+-}._spf.%{d} -all"']},
    "5.2.0.192.bob.user._spf.exists.example": {"A": ["127.0.0.2"]},
    "ptr.example": {"TXT": ['"v=spf1 ptr -all"']},
    "7.2.0.192.in-addr.arpa": {"PTR": ["host.ptr.example."]},
    "host.ptr.example": {"A": ["192.0.2.7"]},
    "helo.example": {"TXT": ['"v=spf1 ip4:192.0.2.9 -all"']},
    "v6.example": {"TXT": ['"v=spf1 ip6:2001:db8::/32 -all"']},
    # eleven include: terms, each costing a lookup: the 11th is over the limit
    "many.example": {"TXT": ['"v=spf1 ' + " ".join(f"include:n{i}.example" for i in range(11)) + ' -all"']},
    **{f"n{i}.example": {"TXT": ['"v=spf1 ?all"']} for i in range(11)},
    # three a: mechanisms pointing at names that do not exist: the third void lookup
    "void.example": {"TXT": ['"v=spf1 a:x1.void.example a:x2.void.example a:x3.void.example -all"']},
    "loop.example": {"TXT": ['"v=spf1 include:loop.example -all"']},
}


@pytest.fixture
async def resolver(nursery) -> Resolver:
    port = await nursery.start(run_dns_server, ZONE, "127.0.47.2")
    return Resolver([ListenAddress("127.0.47.2", port)], lifetime=3.0)


@pytest.mark.parametrize(("sender", "ip", "expected"), [
    ("a@pass.example", "192.0.2.5", "pass"),
    ("a@fail.example", "192.0.2.5", "fail"),
    ("a@soft.example", "192.0.2.5", "softfail"),
    ("a@neutral.example", "192.0.2.5", "neutral"),
    ("a@nothing.example", "192.0.2.5", "none"),
    ("a@nxdomain.example", "192.0.2.5", "none"),
    ("a@singlelabel", "192.0.2.5", "none"),
    ("a@two.example", "192.0.2.5", "permerror"),
    ("a@broken.example", "192.0.2.1", "permerror"),  # the whole record is parsed first
    ("a@badcidr.example", "192.0.2.1", "permerror"),
    ("a@sick.example", "192.0.2.5", "temperror"),
    ("a@incsick.example", "192.0.2.5", "temperror"),
    ("a@a.example", "192.0.2.10", "pass"),
    ("a@a.example", "192.0.2.11", "fail"),
    ("a@acidr.example", "192.0.2.14", "pass"),
    ("a@acidr.example", "192.0.2.17", "fail"),
    ("a@mx.example", "192.0.2.20", "pass"),
    ("a@mx.example", "192.0.2.21", "fail"),
    ("a@inc.example", "192.0.2.5", "pass"),
    ("a@inc.example", "203.0.113.5", "fail"),
    ("a@incnone.example", "192.0.2.5", "permerror"),
    ("a@redir.example", "192.0.2.5", "pass"),
    ("a@redir.example", "203.0.113.5", "fail"),
    ("a@redirnone.example", "192.0.2.5", "permerror"),
    ("user-bob@exists.example", "192.0.2.5", "pass"),
    ("user-alice@exists.example", "192.0.2.5", "fail"),
    ("a@ptr.example", "192.0.2.7", "pass"),
    ("a@ptr.example", "192.0.2.8", "fail"),
    ("a@v6.example", "2001:db8::1", "pass"),
    ("a@v6.example", "192.0.2.1", "fail"),
    ("a@pass.example", "::ffff:192.0.2.5", "pass"),  # an IPv4-mapped client is its IPv4 address
    ("a@many.example", "192.0.2.5", "permerror"),
    ("a@void.example", "192.0.2.5", "permerror"),
    ("a@loop.example", "192.0.2.5", "permerror"),
])
async def test_check_host_result(resolver, sender, ip, expected):
    result = await check_spf(resolver, ip, sender, "client.example")
    assert (result.result, result.identity) == (expected, "mailfrom"), result.reason


async def test_null_sender_checks_the_helo_identity(resolver):
    passed = await check_spf(resolver, "192.0.2.9", "", "helo.example")
    failed = await check_spf(resolver, "192.0.2.8", "", "helo.example")
    assert (passed.result, passed.identity, passed.sender) == ("pass", "helo", "postmaster@helo.example")
    assert failed.result == "fail"


async def test_ten_includes_are_allowed_and_the_eleventh_is_not(resolver, nursery):
    zone = dict(ZONE)
    zone["ten.example"] = {"TXT": ['"v=spf1 ' + " ".join(f"include:n{i}.example" for i in range(10))
                                   + ' ip4:192.0.2.5 -all"']}
    port = await nursery.start(run_dns_server, zone, "127.0.47.3")
    own = Resolver([ListenAddress("127.0.47.3", port)], lifetime=3.0)
    assert (await check_spf(own, "192.0.2.5", "a@ten.example", "h.example")).result == "pass"
    assert (await check_spf(own, "192.0.2.5", "a@many.example", "h.example")).result == "permerror"
