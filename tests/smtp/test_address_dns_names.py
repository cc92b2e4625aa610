"""address.dns_name agrees with dnspython on which domains are DNS names.

The sans-IO core must not import dnspython, yet it must refuse at MAIL/RCPT
exactly the names dnspython would later refuse to look up (issue 13, defect 3).
"""

from __future__ import annotations

import dns.exception
import dns.name
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trimail.smtp.address import AddressError, check_mailbox, dns_name, is_domain

# letters that make the interesting cases: ASCII, hyphens, full stops of several
# scripts, characters IDNA maps, refuses or expands (Latin-1, CJK, ZWJ, circled digits)
ALPHABET = st.sampled_from(list("ab-0.") + ["\u3002", "\uff0e", "\u00e4", "\u00df", "\u200d", "\u2488",
                                             "\u4e2d", "\u0301", "A", "\u00c4"])
LABEL = st.text(ALPHABET, min_size=0, max_size=70)


def dnspython_accepts(domain: str) -> bool:
    try:
        dns.name.from_text(domain)
    except (dns.exception.DNSException, ValueError, UnicodeError):
        return False
    return True


@settings(max_examples=400, deadline=None)
@given(st.lists(LABEL, min_size=1, max_size=6).map(".".join))
def test_dns_name_refuses_exactly_what_dnspython_refuses(domain: str) -> None:
    if domain.rstrip(".\u3002\uff0e\uff61") == "":
        assert dns_name(domain) is None  # the root is no mail domain
        return
    assert (dns_name(domain) is not None) == dnspython_accepts(domain), domain


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 63), min_size=1, max_size=8))
def test_wire_length_limit_is_255_octets(lengths: list[int]) -> None:
    domain = ".".join("a" * n for n in lengths)
    wire = sum(n + 1 for n in lengths) + 1
    assert (dns_name(domain) is not None) == (wire <= 255)
    assert dnspython_accepts(domain) == (wire <= 255)


@pytest.mark.parametrize("domain", [
    ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 62]),  # 254 octets
    "x" * 64 + ".example",
    "a..b.example",
    "ex\u200dample.example",
    "\u00e4" * 60 + ".example",  # the A-label is over 63 octets
])
def test_mailbox_with_a_domain_dns_cannot_express_is_a_syntax_error(domain: str) -> None:
    assert not is_domain(domain)
    with pytest.raises(AddressError):
        check_mailbox(f"b@{domain}", utf8=True)


def test_usable_names_stay_accepted() -> None:
    assert dns_name("b\u00fccher.example") == b"xn--bcher-kva.example"
    assert dns_name("example.com.") == b"example.com"
    assert is_domain("[127.0.0.1]") and is_domain("mx.test.example.")
    assert check_mailbox("b@" + ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61]), utf8=False)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=300))
def test_any_text_gives_a_name_or_none_and_only_address_errors(text: str) -> None:
    assert dns_name(text) is None or isinstance(dns_name(text), bytes)
    try:
        check_mailbox(f"b@{text}", utf8=True)
    except AddressError:
        pass


@settings(max_examples=500, deadline=None)
@given(st.lists(st.text(st.sampled_from(list("ab-0.A")), max_size=70), min_size=1, max_size=6).map(".".join)
       | st.text(st.characters(max_codepoint=127), max_size=300))
def test_an_ascii_name_takes_the_short_way_to_what_the_label_by_label_way_gives(domain: str) -> None:
    """ASCII names (nearly all) skip IDNA: the same answer, every length limit included."""
    from trimail.smtp.address import MAX_DOMAIN, _idna_name

    expected = _idna_name(domain) if domain and len(domain) <= MAX_DOMAIN else None
    assert dns_name(domain) == expected, domain
