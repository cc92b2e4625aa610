"""The SPF record parser and macro language (RFC 7208 sections 4.6, 5, 6 and 7):
the RFC's own macro examples, and property tests (hypothesis): any string gives a
Record or SpfPermError and nothing else, and a record built from valid terms
parses back to the same directives."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trimail.authcheck.spfrecord import (
    Directive,
    MacroEnv,
    SpfPermError,
    expand,
    expand_domain,
    parse,
)

ENV4 = MacroEnv("strong-bad@email.example.com", "email.example.com", "192.0.2.3", "mx.example.org")
ENV6 = MacroEnv("strong-bad@email.example.com", "email.example.com", "2001:db8::cb01", "mx.example.org")


@pytest.mark.parametrize(("macro", "expanded"), [  # RFC 7208 section 7.4
    ("%{s}", "strong-bad@email.example.com"),
    ("%{o}", "email.example.com"),
    ("%{d}", "email.example.com"),
    ("%{d4}", "email.example.com"),
    ("%{d3}", "email.example.com"),
    ("%{d2}", "example.com"),
    ("%{d1}", "com"),
    ("%{dr}", "com.example.email"),
    ("%{d2r}", "example.email"),
    ("%{l}", "strong-bad"),
    ("%{l-}", "strong.bad"),
    ("%{lr}", "strong-bad"),
    ("%{lr-}", "bad.strong"),
    ("%{l1r-}", "strong"),
    ("%{ir}.%{v}._spf.%{d2}", "3.2.0.192.in-addr._spf.example.com"),
    ("%{lr-}.lp._spf.%{d2}", "bad.strong.lp._spf.example.com"),
    ("%{lr-}.lp.%{ir}.%{v}._spf.%{d2}", "bad.strong.lp.3.2.0.192.in-addr._spf.example.com"),
    ("%{ir}.%{v}.%{l1r-}.lp._spf.%{d2}", "3.2.0.192.in-addr.strong.lp._spf.example.com"),
    ("%{d2}.trusted-domains.example.net", "example.com.trusted-domains.example.net"),
    ("%%%_%-", "% %20"),
    ("%{S}", "strong-bad%40email.example.com"),  # upper case: URL-escaped
])
def test_rfc_macro_examples(macro, expanded):
    assert expand(macro, ENV4) == expanded


def test_rfc_ipv6_macro_example():
    assert expand("%{ir}.%{v}._spf.%{d2}", ENV6) == (
        "1.0.b.c.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6._spf.example.com")


@pytest.mark.parametrize("bad", ["%{c}", "%{r}.x.example", "%{t}", "%{d0}", "%{x}", "%{d", "%", "%a", "a b"])
def test_bad_macros_and_explanation_only_letters_are_permerror(bad):
    with pytest.raises(SpfPermError):
        expand(bad, ENV4)


def test_a_long_expansion_loses_labels_on_the_left():
    env = MacroEnv("x@" + ".".join(["label"] * 60) + ".example", "d.example", "192.0.2.3", "h")
    name = expand_domain("%{o}", env)
    assert len(name) <= 253 and name.endswith(".label.example")


@pytest.mark.parametrize("record", [
    "v=spf1 ip4:192.0.2.1/33", "v=spf1 ip6:2001:db8::/129", "v=spf1 ip4:2001:db8::1", "v=spf1 a/24//129",
    "v=spf1 include", "v=spf1 include:", "v=spf1 exists", "v=spf1 redirect=a.example redirect=b.example",
    "v=spf1 exp=a.example exp=b.example", "v=spf1 foo:bar.example", "v=spf1 all:x", "v=spf1 a:example.123",
    "v=spf1 -", "v=spf1 ip4:192.0.2.01/024", "v=spf1 mx:%{c}.example", "v=spf1 =x",
])
def test_syntax_errors_are_permerror(record):
    with pytest.raises(SpfPermError):
        parse(record)


def test_unknown_modifiers_are_ignored_and_mechanism_names_are_case_insensitive():
    record = parse("V=SPF1 MX:mail.example/24 unknown-mod=%{d}.x ~ALL")
    assert record.directives == (Directive("pass", "mx", "mail.example", cidr4=24),
                                 Directive("softfail", "all"))


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=300))
def test_any_text_after_the_version_is_a_record_or_permerror(text):
    try:
        parse("v=spf1 " + text)
    except SpfPermError:
        pass


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=80))
def test_any_macro_string_expands_or_is_permerror(text):
    try:
        expand(text, ENV6)
    except SpfPermError:
        pass


_label = st.from_regex(r"[a-z][a-z0-9]{0,10}", fullmatch=True)
_domain = st.lists(_label, min_size=2, max_size=4).map(".".join)
_qualifier = st.sampled_from(["", "+", "-", "~", "?"])
_ip4 = st.ip_addresses(v=4).map(str)
_ip6 = st.ip_addresses(v=6).map(str)


@st.composite
def _term(draw) -> tuple[str, Directive]:
    q = draw(_qualifier)
    result = {"": "pass", "+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}[q]
    kind = draw(st.sampled_from(["ip4", "ip6", "a", "mx", "include", "exists", "ptr"]))
    if kind == "ip4":
        ip, length = draw(_ip4), draw(st.integers(0, 32))
        return f"{q}ip4:{ip}/{length}", Directive(result, "ip4", network=ip, cidr4=length)
    if kind == "ip6":
        ip, length = draw(_ip6), draw(st.integers(0, 128))
        return f"{q}ip6:{ip}/{length}", Directive(result, "ip6", network=ip, cidr6=length)
    domain = draw(_domain)
    if kind in ("a", "mx"):
        c4 = draw(st.none() | st.integers(0, 32))
        c6 = draw(st.none() | st.integers(0, 128))
        suffix = (f"/{c4}" if c4 is not None else "") + (f"//{c6}" if c6 is not None else "")
        return f"{q}{kind}:{domain}{suffix}", Directive(result, kind, domain, cidr4=c4, cidr6=c6)
    return f"{q}{kind}:{domain}", Directive(result, kind, domain)


@settings(max_examples=300, deadline=None)
@given(st.lists(_term(), max_size=8), st.none() | _domain, st.sampled_from(["", " -all", " ?all"]))
def test_a_record_of_valid_terms_parses_back_to_its_directives(terms, redirect, tail):
    text = "v=spf1 " + " ".join(t for t, _ in terms) + tail + (f" redirect={redirect}" if redirect else "")
    record = parse(text)
    expected = [d for _, d in terms] + ([Directive({"-": "fail", "?": "neutral"}[tail[1]], "all")] if tail else [])
    assert list(record.directives) == expected
    assert record.redirect == redirect
