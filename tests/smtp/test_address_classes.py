"""The address syntax's character classes are written as the ASCII they leave out
(trimail/smtp/address.py: sre compiles a class with ``\\x80-\\U0010ffff`` slowly, and
every process paid for it at start).  Each must take exactly the characters of its
positive form, over all of Unicode, and the patterns built from them must decide as
the positive ones do."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trimail.smtp import address

EVERY_CHARACTER = "".join(map(chr, range(0x110000)))  # lone surrogates included

POSITIVE = {  # RFC 5321 4.1.2 and RFC 6531 3.3 (UTF-8 wherever ASCII text is allowed)
    "_ATEXT": r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\x80-\U0010ffff]",
    "_QTEXT": r"[\x20\x21\x23-\x5b\x5d-\x7e\x80-\U0010ffff]",
    "_LET_DIG": r"[A-Za-z0-9\x80-\U0010ffff]",
    "_LDH": r"[A-Za-z0-9\-\x80-\U0010ffff]",
}


@pytest.mark.parametrize("name", list(POSITIVE))
def test_each_class_takes_exactly_the_characters_of_its_positive_form(name):
    written = re.compile(getattr(address, name))
    positive = re.compile(POSITIVE[name])
    assert written.findall(EVERY_CHARACTER) == positive.findall(EVERY_CHARACTER)


_ATEXT, _QTEXT, _LET_DIG, _LDH = POSITIVE.values()
BEFORE = {  # the module's patterns as they were written with the positive classes
    "_DOT_STRING": re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*"),
    "_QUOTED": re.compile(rf'"(?:{_QTEXT}|\\[\x20-\x7e])*"'),
    "_LABEL": re.compile(rf"(?:{_LET_DIG}(?:{_LDH}{{0,61}}{_LET_DIG})?)"),
}
PIECES = st.sampled_from(['"', "\\", ".", "-", "a", "Z", "9", "@", " ", "\x7f", "\x80", "é",
                          "\u2028", "\U0001f600", "\ud800", "(", "[", "]", ":", "\x00", "_"])


@settings(max_examples=500, deadline=None)
@given(text=st.one_of(st.text(max_size=70), st.lists(PIECES, max_size=70).map("".join)))
def test_the_patterns_decide_as_they_did_with_the_positive_classes(text):
    for name, before in BEFORE.items():
        now = getattr(address, name).fullmatch(text)
        assert (now is None) == (before.fullmatch(text) is None), name
