"""Property tests of the DSN parameter parsers (trimail.smtp.dsn): xtext and uxtext
round trips, and only the documented error comes out of the parsers."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from trimail.smtp import dsn

texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60)


@given(texts)
def test_xtext_round_trip(text):
    coded = dsn.xtext_encode(text)
    assert coded.isascii() and " " not in coded and "=" not in coded
    assert all("!" <= ch <= "~" for ch in coded)
    assert dsn.xtext_decode(coded) == text


@given(texts)
def test_uxtext_round_trip(text):
    coded = dsn.uxtext_encode(text)
    assert all("!" <= ch <= "~" for ch in coded)
    assert dsn.uxtext_decode(coded) == text


@given(st.text(max_size=40))
def test_xtext_decoder_returns_text_or_raises_xtext_error(text):
    try:
        decoded = dsn.xtext_decode(text)
    except dsn.XtextError:
        return
    assert dsn.xtext_decode(dsn.xtext_encode(decoded)) == decoded


@given(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e), max_size=12).map(
    lambda t: t.replace("+", "+2B")))
def test_plain_xchars_decode_to_themselves(text):
    assert dsn.xtext_decode(text) == text.replace("+2B", "+")


@given(st.text(max_size=40), st.text(max_size=40))
def test_parsers_answer_none_or_their_reply_only(a, b):
    assert dsn.check_ret(a) in (None, dsn.BAD_RET)
    assert dsn.check_envid(a) in (None, dsn.BAD_ENVID)
    assert dsn.check_notify(a) in (None, dsn.BAD_NOTIFY)
    assert dsn.check_orcpt(f"{a};{b}") in (None, dsn.BAD_ORCPT)


@given(st.lists(st.sampled_from(["SUCCESS", "FAILURE", "DELAY", "success", "Delay", "NEVER", "never", ""]),
                max_size=6))
def test_notify_list_is_never_alone_or_a_set_of_the_three(words):
    value = ",".join(words)
    parsed = dsn.notify_words(value)
    upper = {w.upper() for w in words if w}
    if not upper or ("NEVER" in upper and len(upper) > 1):
        assert parsed is None
    elif upper == {"NEVER"}:
        assert parsed == ("NEVER",)
    else:
        assert set(parsed) == upper and len(parsed) == len(upper)


@given(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=100))
def test_any_printable_envid_of_100_is_accepted_when_encoded(text):
    assert dsn.check_envid(dsn.xtext_encode(text) or "+20") is None


@given(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), min_size=101, max_size=140))
def test_an_envid_longer_than_100_is_refused(text):
    assert dsn.check_envid(dsn.xtext_encode(text)) is dsn.BAD_ENVID


@given(st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=80))
def test_orcpt_of_any_address_without_controls_round_trips(address):
    for kind in ("rfc822", "utf-8"):
        value = dsn.orcpt_param(kind, address)
        if len(value) <= dsn.MAX_ORCPT and not any(ch in address for ch in "\u2028\u2029") \
                and not any("\x80" <= ch <= "\x9f" for ch in address):
            assert dsn.parse_orcpt(value) == (kind, address)
