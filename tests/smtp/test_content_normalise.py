"""DATA content leaves the machine with CRLF line ends only (smtpd_forbid_bare_newline,
cleanup_replace_stray_cr_lf): whatever bytes a client sends, every stored line ends
in CRLF and holds no other CR or LF, and the message ends only at CRLF.CRLF."""

from __future__ import annotations

import re

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tests.smtp.driver import Driver
from trimail.smtp.content import replace_stray_cr, replace_stray_cr_lf
from trimail.smtp.dotreader import DotReader
from trimail.smtp.events import DataAborted, DataEnd
from trimail.smtp.server import Settings

HEAD = b"EHLO c.example\r\nMAIL FROM:<a@c.example>\r\nRCPT TO:<b@d.example>\r\nDATA\r\n"
STRAY = re.compile(rb"\r(?!\n)|(?<!\r)\n")

# content bytes biased towards the characters that matter
_bytes = st.lists(st.sampled_from([b"\r", b"\n", b".", b"x", b"\r\n", b"\xff", b" "]), max_size=200).map(b"".join)


def test_replace_stray_cr_lf_keeps_crlf_and_spaces_the_rest():
    assert replace_stray_cr_lf(b"a\r\nb\rc\nd\r\r\n\n\r") == b"a\r\nb c d \r\n  "
    assert replace_stray_cr_lf(b"plain\r\n") == b"plain\r\n"


@given(_bytes)
def test_replace_stray_cr_lf_property(data):
    out = replace_stray_cr_lf(data)
    assert len(out) == len(data)
    assert not STRAY.search(out)
    assert out.count(b"\r\n") == data.count(b"\r\n")


def test_bare_cr_before_a_dot_is_a_space_not_a_line_end():
    d = Driver().feed(HEAD + b"first\r.\r\nsecond\r\n.\r\n")
    assert d.content() == b"first .\r\nsecond\r\n"
    assert len(d.of_type(DataEnd)) == 1


def test_stray_cr_is_kept_when_replacement_is_off():
    d = Driver(Settings(replace_stray_cr_lf=False)).feed(HEAD + b"a\rb\r\n.\r\n")
    assert d.content() == b"a\rb\r\n"


@settings(max_examples=300, deadline=None)
@given(_bytes, st.lists(st.integers(min_value=1, max_value=64), max_size=20))
def test_any_content_is_stored_with_crlf_line_ends_only(body, cuts):
    """Fed in arbitrary pieces: the stored content is CRLF lines with no other CR or LF."""
    wire = HEAD + body + b"\r\n.\r\n"
    d = Driver()
    pos = 0
    for size in cuts:
        d.feed(wire[pos:pos + size])
        pos += size
    d.feed(wire[pos:])
    content = d.content()
    assert d.of_type(DataEnd) or d.of_type(DataAborted)
    assert not STRAY.search(content), content
    assert content == b"" or content.endswith(b"\r\n")


@settings(max_examples=200, deadline=None)
@given(_bytes)
def test_data_ends_only_at_crlf_dot_crlf(body):
    """Without CRLF.CRLF inside, the content is one message whatever LF/CR/dot mix it has."""
    assume(b"\r\n.\r\n" not in b"\r\n" + body + b"\r\n")
    d = Driver().feed(HEAD + body + b"\r\n.\r\nNOOP\r\n")
    assert len(d.of_type(DataEnd)) == 1
    assert d.replies()[-1] == "250 2.0.0 Ok"  # the NOOP after it: in step


@given(_bytes)
def test_replace_stray_cr_agrees_on_the_readers_output(data):
    lf_free = data.replace(b"\n", b"\r\n")  # every LF follows a CR, as the DATA reader makes it
    out = replace_stray_cr(lf_free)
    assert out == replace_stray_cr_lf(lf_free)
    assert not STRAY.search(out)


def data_model(wire: bytes, replace: bool) -> tuple[bytes, bool]:
    """The DATA rules line by line, as the reader's docstring states them: the content
    (as stored) and whether the end marker was read.  Normalise mode (no reject)."""
    out, pos, prev_crlf = [], 0, True
    while (lf := wire.find(b"\n", pos)) >= 0:
        line, pos = wire[pos:lf + 1], lf + 1
        crlf = line.endswith(b"\r\n")
        if line == b".\r\n" and prev_crlf:
            return b"".join(out), True
        text = line[1:] if line.startswith(b".") else line
        text = text[:-2] if crlf else text[:-1]
        out.append((text.replace(b"\r", b" ") if replace else text) + b"\r\n")
        prev_crlf = crlf
    return b"".join(out), False


# lines as mail has them (CRLF, some dots, now and then a stray CR or a bare LF)
_line = st.tuples(st.sampled_from([b"", b".", b"..", b"x", b"a.b", b"\r", b".\r", b"\xff"]),
                  st.one_of(st.integers(min_value=0, max_value=90), st.just(4500)),  # 4500: past FLUSH
                  st.sampled_from([b"\r\n"] * 8 + [b"\n", b"\r\r\n"])).map(lambda t: t[0] + b"y" * t[1] + t[2])
_content = st.lists(_line, max_size=60).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(st.one_of(_content, _bytes), st.lists(st.integers(min_value=1, max_value=700), max_size=12), st.booleans())
def test_the_data_reader_in_any_pieces_stores_what_the_line_rules_give(body, cuts, replace):
    """Bulk passes and line-by-line reading (and where the pieces are cut) must agree
    byte for byte with the rules applied one line at a time."""
    wire = body + b"\r\n.\r\nNOOP\r\n"
    reader = DotReader(replace_stray=replace)
    buf, got, ended, pos = bytearray(), [], False, 0
    for size in [*cuts, len(wire)]:
        buf += wire[pos:pos + size]
        pos += size
        while not ended:
            content, ended, progressed = reader.read(buf)
            got.append(content)
            if not progressed:
                break
    expected, marker = data_model(wire, replace)
    assert ended and marker
    assert b"".join(got) == expected
    assert reader.size == len(expected)
    assert bytes(buf).endswith(b"NOOP\r\n")
