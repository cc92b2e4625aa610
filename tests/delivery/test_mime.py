"""The 8-bit to quoted-printable conversion (mime.Downgrader), as a pure function."""

from __future__ import annotations

import binascii

from hypothesis import given, settings
from hypothesis import strategies as st

from trimail.delivery.mime import MAX_HEADER_BLOCK, MAX_LINE, Downgrader, needs_smtputf8

HEAD = b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"

lines = st.lists(st.binary(max_size=300).map(lambda b: b.replace(b"\n", b"")), max_size=20)


def convert(content: bytes, cuts: list[int] | None = None) -> bytes:
    d = Downgrader()
    out = bytearray()
    start = 0
    for cut in sorted(cuts or []):
        out += d.feed(content[start:cut])
        start = max(start, cut)
    out += d.feed(content[start:])
    return bytes(out + d.finish())


@settings(max_examples=300, deadline=None)
@given(lines, st.lists(st.integers(0, 7000), max_size=8))
def test_any_split_of_the_content_gives_the_same_bytes(body_lines, cuts):
    content = HEAD + b"".join(line.rstrip(b"\r") + b"\r\n" for line in body_lines)
    assert convert(content, cuts) == convert(content)


@settings(max_examples=300, deadline=None)
@given(lines)
def test_a_converted_body_is_short_ascii_lines_that_decode_to_the_original(body_lines):
    body_lines = [line.rstrip(b"\r") for line in body_lines]
    content = HEAD + b"".join(line + b"\r\n" for line in body_lines)
    out = convert(content)
    headers, _, body = out.partition(b"\r\n\r\n")
    assert headers == b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable"
    assert body.isascii()
    assert all(len(line) <= 76 for line in body.split(b"\r\n"))
    assert binascii.a2b_qp(body) == b"".join(line + b"\r\n" for line in body_lines)


def test_an_entity_without_an_8bit_label_is_left_alone():
    content = b"Content-Type: text/plain\r\n\r\ncaf\xc3\xa9\r\n"
    assert convert(content) == content


def test_a_header_block_past_the_limit_ends_conversion_and_passes_everything_through():
    content = (b"X-Big: " + b"a" * 1000 + b"\r\n") * (MAX_HEADER_BLOCK // 1000) + HEAD + b"\xe9\r\n"
    assert convert(content) == content
    assert convert(content, list(range(0, len(content), 70000))) == content


def test_a_partial_header_line_past_the_limit_ends_conversion_too():
    content = b"X-Big: " + b"a" * (MAX_LINE + 10)
    assert convert(content, [MAX_LINE + 5]) == content


def test_a_nested_message_rfc822_has_its_own_headers():
    content = (b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
               b"Subject: inner\r\nContent-Transfer-Encoding: 8bit\r\n\r\n\xe9t\xe9\r\n")
    assert convert(content) == (b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
                                b"Subject: inner\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n=E9t=E9\r\n")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000), st.lists(st.integers(0, 3000), max_size=5))
def test_garbage_never_raises(content, cuts):
    convert(content, cuts)


def test_smtputf8_is_needed_for_utf8_addresses_or_headers_only():
    assert needs_smtputf8("a@x", ["rené@y"], b"Subject: x\r\n\r\n")
    assert needs_smtputf8("a@x", ["b@y"], "Subject: café\r\n\r\nbody".encode())
    assert not needs_smtputf8("a@x", ["b@y"], "Subject: x\r\n\r\ncafé in the body".encode())


mime_lines = st.lists(st.sampled_from([
    b"Content-Type: multipart/mixed; boundary=b", b"Content-Type: multipart/alternative; boundary=\"c d\"",
    b"Content-Type: message/rfc822", b"Content-Type: text/plain", b"Content-Transfer-Encoding: 7bit",
    b"Content-Transfer-Encoding: quoted-printable", b"Content-Transfer-Encoding: base64", b"  folded",
    b"--b", b"--b--", b"--c d", b"--c d--", b"", b"Subject: s", b"caf\xc3\xa9", b".", b"=", b"x" * 100,
    b"no header here", b"\xff\xfe",
]), max_size=40)


@settings(max_examples=500, deadline=None)
@given(mime_lines, st.sampled_from([b"\r\n", b"\n"]), st.booleans(), st.lists(st.integers(0, 2000), max_size=4))
def test_content_without_an_8bit_label_passes_byte_for_byte(body_lines, eol, last_newline, cuts):
    content = eol.join(body_lines) + (eol if last_newline else b"")
    assert convert(content, cuts) == content


@settings(max_examples=500, deadline=None)
@given(mime_lines, st.lists(st.integers(0, 2000), max_size=4))
def test_labelled_8bit_mime_of_any_shape_converts_the_same_in_any_split(body_lines, cuts):
    content = b"Content-Transfer-Encoding: 8bit\r\n" + b"\r\n".join(
        line.replace(b"7bit", b"8bit") for line in body_lines) + b"\r\n"
    assert convert(content, cuts) == convert(content)
