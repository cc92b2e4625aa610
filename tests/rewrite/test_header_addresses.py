"""cleanup.headers.header_addresses: the stdlib's address-list parser, safe on
comments nested deeper than Python's recursion limit (red team 31); and
without_comments, the one-pass reading it falls back to."""

from __future__ import annotations

import email.utils

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trimail.catch.mime import MessageView
from trimail.cleanup.headers import header_addresses, without_comments


@pytest.mark.parametrize("value", [
    "john@example.com (John Doe)",
    '"a (not a comment)" <x@y.example>',
    "(((a)b)c) ceo@bank.example",
    '"q\\"(" <z@w.example>',
    "a@[1.2.3.4] (c(d)e)",
    "Group: a@x.example, (c) b@y.example;",
])
def test_ordinary_values_are_read_as_the_stdlib_reads_them(value):
    assert header_addresses(value) == email.utils.getaddresses([value])


def test_comments_nested_past_the_recursion_limit_still_give_the_address():
    value = "(" * 5000 + ")" * 5000 + " Alice <ceo@bank.example>"
    with pytest.raises(RecursionError):
        email.utils.getaddresses([value])
    assert header_addresses(value) == [("Alice", "ceo@bank.example")]
    assert header_addresses("(" * 5000 + " ceo@bank.example") == []  # never closed: all comment


@pytest.mark.parametrize("value, expected", [
    ("a (b (c) d) e", "a   e"),
    ('"(kept)" (gone)', '"(kept)"  '),
    ("[1.2.3.4 (x)] (y)", "[1.2.3.4 (x)]  "),
    ("a (c\\)d) e", "a   e"),  # a quoted pair in a comment does not end it
    ("x (unclosed", "x "),
])
def test_without_comments(value, expected):
    assert without_comments(value) == expected


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet='()"\\[]<>@,;: ax.é', max_size=60))
def test_no_value_makes_it_raise(value):
    header_addresses(value)
    header_addresses("(" * 3000 + value + ")" * 3000)


def test_the_catchers_message_view_reads_such_a_from_field():
    raw = (b"From: " + b"(" * 3000 + b")" * 3000 + b" Alice <alice@x.example>\r\n"
           b"Subject: s\r\n\r\nbody\r\n")
    assert MessageView(raw).addresses("From") == [{"Name": "Alice", "Address": "alice@x.example"}]
