"""DKIM verification (keys fetched through the trio resolver from the loopback DNS
server) and DMARC policy discovery and alignment (RFC 7489).

Loopback addresses of this test module: the DNS server on 127.0.47.4."""

from __future__ import annotations

import time

import dkim
import pytest

from tests.authcheck.keys import MESSAGE, new_key, txt
from tests.dnsserver import run_dns_server
from trimail.authcheck.dkimverify import DkimResult, verify_dkim
from trimail.authcheck.dmarc import check_dmarc, from_domain, organizational_domain
from trimail.authcheck.signing import SigningKey, _KeyCache, sign_message
from trimail.authcheck.spf import SpfResult
from trimail.config.values import ListenAddress
from trimail.net.dns import Resolver

RSA_PEM, RSA_TXT = new_key("rsa")
ED_PEM, ED_TXT = new_key("ed25519")
OTHER_PEM, OTHER_TXT = new_key("rsa")

ZONE: dict = {
    "rsa._domainkey.sender.example": {"TXT": [RSA_TXT]},
    "ed._domainkey.sender.example": {"TXT": [ED_TXT]},
    "rotated._domainkey.sender.example": {"TXT": [OTHER_TXT]},  # a key that did not make the signature
    "broken._domainkey.sender.example": {"TXT": [txt("v=DKIM1; k=rsa; p=notbase64!!")]},
    "sick._domainkey.sender.example": "SERVFAIL",
    "_dmarc.sender.example": {"TXT": [txt("v=DMARC1; p=reject; sp=quarantine; adkim=r; aspf=r")]},
    "_dmarc.strict.example": {"TXT": [txt("v=DMARC1; p=reject; adkim=s; aspf=s")]},
    "_dmarc.half.example": {"TXT": [txt("v=DMARC1; p=reject; pct=0")]},
    "_dmarc.twice.example": {"TXT": [txt("v=DMARC1; p=reject"), txt("v=DMARC1; p=none")]},
    "_dmarc.sick.example": "SERVFAIL",
}


@pytest.fixture
async def resolver(nursery) -> Resolver:
    port = await nursery.start(run_dns_server, ZONE, "127.0.47.4")
    return Resolver([ListenAddress("127.0.47.4", port)], lifetime=3.0)


def dkimpy_signed(selector: bytes, message: bytes = MESSAGE, pem: bytes = RSA_PEM) -> bytes:
    """Signed by dkimpy itself (not by trimail's signer)."""
    return dkim.sign(message, selector, b"sender.example", pem, canonicalize=(b"relaxed", b"simple")) + message


async def test_a_good_rsa_signature_passes(resolver):
    [result] = await verify_dkim(resolver, dkimpy_signed(b"rsa"))
    assert (result.result, result.domain, result.selector, result.algorithm) == (
        "pass", "sender.example", "rsa", "rsa-sha256")
    assert len(result.signature) == 8


async def test_a_changed_body_fails(resolver):
    signed = dkimpy_signed(b"rsa").replace(b"this is signed", b"this is forged")
    [result] = await verify_dkim(resolver, signed)
    assert (result.result, result.reason) == ("fail", "body hash did not verify")


async def test_a_changed_signed_header_fails(resolver):
    signed = dkimpy_signed(b"rsa").replace(b"Subject: hello", b"Subject: HELLO there")
    assert [r.result for r in await verify_dkim(resolver, signed)] == ["fail"]


async def test_a_signature_by_another_key_fails(resolver):
    signed = dkimpy_signed(b"rotated")
    assert [r.result for r in await verify_dkim(resolver, signed)] == ["fail"]


async def test_missing_broken_and_unreachable_keys(resolver):
    assert [(r.result, r.reason) for r in await verify_dkim(resolver, dkimpy_signed(b"absent"))] == [
        ("permerror", "no key for signature")]
    assert [r.result for r in await verify_dkim(resolver, dkimpy_signed(b"broken"))] == ["permerror"]
    assert [r.result for r in await verify_dkim(resolver, dkimpy_signed(b"sick"))] == ["temperror"]


async def test_an_unsigned_message_has_no_results_and_a_mangled_signature_is_permerror(resolver):
    assert await verify_dkim(resolver, MESSAGE) == []
    mangled = b"DKIM-Signature: v=1; a=rsa-sha256; d=sender.example; s=rsa; this is not a tag list\r\n" + MESSAGE
    assert [r.result for r in await verify_dkim(resolver, mangled)] == ["permerror"]


async def test_ed25519_signed_by_trimail_passes_and_tampering_fails(resolver, tmp_path):
    path = tmp_path / "ed.key"
    path.write_bytes(ED_PEM)
    field = sign_message(MESSAGE, SigningKey("sender.example", "ed", str(path)), _KeyCache())
    assert b"a=ed25519-sha256" in field
    assert [r.result for r in await verify_dkim(resolver, field + MESSAGE)] == ["pass"]
    tampered = field + MESSAGE.replace(b"Bob", b"Eve")
    assert [r.result for r in await verify_dkim(resolver, tampered)] == ["fail"]



async def test_signatures_of_one_message_with_different_c_and_l_each_get_their_own_verdict(resolver, tmp_path):
    """The signatures of a message share its body hashes, each kept by canonicalization,
    algorithm and l=: a shared hash must never decide another signature's verdict."""
    path = tmp_path / "ed.key"
    path.write_bytes(ED_PEM)
    message = MESSAGE + b"Second  line,\ttabbed   \r\n\r\n\r\n"
    fields = [dkim.sign(message, b"rsa", b"sender.example", RSA_PEM, canonicalize=canon, length=length)
              for canon, length in (((b"relaxed", b"simple"), False), ((b"simple", b"relaxed"), False),
                                    ((b"relaxed", b"relaxed"), True), ((b"simple", b"simple"), True))]
    fields.append(sign_message(message, SigningKey("sender.example", "ed", str(path)), _KeyCache()))
    other_body = dkim.sign(message.replace(b"Second", b"Third"), b"rsa", b"sender.example", RSA_PEM,
                           canonicalize=(b"relaxed", b"simple"))  # the first field's combination, another body
    assert [(r.result, r.reason) for r in await verify_dkim(resolver, b"".join(fields) + message)] == [("pass", "")] * 5
    assert [(r.result, r.reason) for r in await verify_dkim(resolver, other_body + fields[0] + message)] == [
        ("fail", "body hash did not verify"), ("pass", "")]
    changed = b"".join(fields) + message.replace(b"Second", b"Third")
    assert [r.result for r in await verify_dkim(resolver, changed)] == ["fail"] * 5


async def test_five_signatures_on_a_5_mb_body_cost_little_more_cpu_than_one(resolver):
    """dkimpy split the message into lines, canonicalized its body and hashed it again
    for every signature: five signatures on a 10 MB body cost 7 s of CPU, five times
    one, most of it with the GIL held.  The signatures now share one split and one
    body hash."""
    message = MESSAGE + b"a line of text, with  two spaces and a tab\t\r\n" * 120_000
    field = dkim.sign(message, b"rsa", b"sender.example", RSA_PEM, canonicalize=(b"relaxed", b"relaxed"))

    async def cpu_seconds(signed: bytes) -> float:
        start = time.process_time()
        assert {r.result for r in await verify_dkim(resolver, signed)} == {"pass"}
        return time.process_time() - start

    one = await cpu_seconds(field + message)
    five = await cpu_seconds(field * 5 + message)
    assert five < 2 * one, (one, five)


def spf(result: str, domain: str) -> SpfResult:
    return SpfResult(result, "mailfrom", domain, f"bounce@{domain}")


def dkim_pass(domain: str) -> DkimResult:
    return DkimResult("pass", domain, "s")


@pytest.mark.parametrize(("header_from", "spf_result", "dkims", "expected"), [
    # relaxed alignment: same organisational domain
    ("mail.sender.example", spf("pass", "bounces.sender.example"), [], ("pass", "quarantine", "none")),
    ("sender.example", spf("fail", "sender.example"), [dkim_pass("sender.example")], ("pass", "reject", "none")),
    ("sender.example", spf("pass", "elsewhere.example"), [dkim_pass("elsewhere.example")],
     ("fail", "reject", "reject")),
    ("sender.example", spf("softfail", "sender.example"), [], ("fail", "reject", "reject")),
    # strict alignment: the very domain
    ("strict.example", spf("pass", "bounces.strict.example"), [dkim_pass("s.strict.example")],
     ("fail", "reject", "reject")),
    ("strict.example", spf("pass", "strict.example"), [], ("pass", "reject", "none")),
    # pct=0: the policy applies to no message; the next milder one does
    ("half.example", None, [], ("fail", "reject", "quarantine")),
    ("nodmarc.example", spf("pass", "nodmarc.example"), [], ("none", "none", "none")),
    ("twice.example", None, [], ("none", "none", "none")),
    ("sick.example", None, [], ("temperror", "none", "none")),
    (None, None, [], ("permerror", "none", "none")),
])
async def test_dmarc(resolver, header_from, spf_result, dkims, expected):
    result = await check_dmarc(resolver, header_from, spf_result, dkims)
    assert (result.result, result.policy, result.disposition) == expected


def test_from_domain_wants_exactly_one_from_address():
    assert from_domain(b"From: A <a@Mail.Example.COM>\r\nTo: b@x\r\n") == "mail.example.com"
    assert from_domain(b"From:\r\n a@folded.example\r\n") == "folded.example"
    assert from_domain(b"From: a@one.example, b@two.example\r\n") is None
    assert from_domain(b"From: a@one.example\r\nFrom: b@two.example\r\n") is None
    assert from_domain(b"To: b@x\r\n") is None


def test_organizational_domain_uses_the_public_suffix_list():
    assert organizational_domain("a.b.example.co.uk") == "example.co.uk"
    assert organizational_domain("mail.example.com") == "example.com"
