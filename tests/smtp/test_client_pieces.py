"""The SMTP client's pure pieces: reply parsing, extensions, dot-stuffing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.smtp.driver import Driver
from trimail.smtp.client import DotStuffer, Extensions, PeerProtocolError, ReplyParser


def test_multiline_reply_with_enhanced_codes():
    parser = ReplyParser()
    parser.feed(b"250-mx.example\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 8BITMIME\r\n550 5.1.1 no")
    reply = parser.next_reply()
    assert reply.code == 250 and reply.lines() == ("mx.example", "PIPELINING", "SIZE 1000", "8BITMIME")
    ext = Extensions.from_ehlo(reply)
    assert ext.has("PIPELINING") and ext.size_limit == 1000 and not ext.has("SMTPUTF8")
    assert parser.next_reply() is None
    parser.feed(b" such user\r\n")
    reply = parser.next_reply()
    assert (reply.code, reply.enhanced, reply.text) == (550, "5.1.1", "no such user")


@pytest.mark.parametrize("bad", [b"hello\r\n", b"250-a\r\n251 b\r\n", b"25\r\n", b"250x\r\n", b"x" * 5000,
                                 "2\u00b2\u00b3 ok\r\n".encode()])
def test_malformed_replies_are_peer_errors(bad):
    parser = ReplyParser()
    parser.feed(bad)
    with pytest.raises(PeerProtocolError):
        parser.next_reply()


@given(st.binary(max_size=200))
def test_reply_parser_only_raises_peer_errors(data):
    parser = ReplyParser()
    parser.feed(data)
    try:
        while parser.next_reply() is not None:
            pass
    except PeerProtocolError:
        pass


def test_a_size_keyword_with_non_ascii_digits_is_no_limit():
    parser = ReplyParser()
    parser.feed("250-mx.example\r\n250 SIZE \u00b2\r\n".encode())
    assert Extensions.from_ehlo(parser.next_reply()).size_limit is None


@pytest.mark.parametrize("address", ["a@x.example>\r\nRCPT TO:<injected@evil.example", "a\n@x.example", "a\x00@x"])
def test_the_client_never_formats_an_address_with_a_control_character(address):
    from trimail.smtp.client import mail_command, rcpt_command

    with pytest.raises(ValueError):
        rcpt_command(address)
    with pytest.raises(ValueError):
        mail_command(address, 10, Extensions.from_ehlo(_ehlo()), eight_bit=False, smtputf8=False)


def _ehlo():
    parser = ReplyParser()
    parser.feed(b"250 mx.example\r\n")
    return parser.next_reply()


@given(st.lists(st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")), max_size=20),
       st.lists(st.integers(0, 500), max_size=6))
def test_dot_stuffed_content_round_trips_through_our_server(lines, cuts):
    content = b"".join(line + b"\r\n" for line in lines)
    stuffer = DotStuffer()
    positions = sorted({min(c, len(content)) for c in cuts} | {0, len(content)})
    wire = b"".join(stuffer.stuff(content[a:b]) for a, b in zip(positions, positions[1:])) + stuffer.finish()
    d = Driver().feed(b"EHLO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n" + wire)
    assert d.content() == content
    assert d.queued == 1


def test_dot_stuffer_adds_missing_final_line_end():
    stuffer = DotStuffer()
    assert stuffer.stuff(b".x") + stuffer.finish() == b"..x\r\n.\r\n"


@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=8))
def test_dot_stuffer_never_emits_a_stray_cr_or_lf(content, cuts):
    """Content queued before receipt normalised it (or made by any other path) may
    hold a bare CR or LF; what goes on the wire has CRLF line ends only, whatever
    the chunking, and the length of each line is kept (a stray end becomes a space)."""
    stuffer = DotStuffer()
    positions = sorted({min(c, len(content)) for c in cuts} | {0, len(content)})
    wire = b"".join(stuffer.stuff(content[a:b]) for a, b in zip(positions, positions[1:])) + stuffer.finish()
    assert wire.count(b"\r") == wire.count(b"\r\n") == wire.count(b"\n")
    assert wire == b".\r\n" if not content else wire.endswith(b"\r\n.\r\n")


def test_dot_stuffer_turns_a_bare_cr_dot_into_text():
    stuffer = DotStuffer()
    wire = stuffer.stuff(b"first\r.\r") + stuffer.stuff(b"\nMAIL FROM:<x@y>\r\n") + stuffer.finish()
    assert wire == b"first .\r\nMAIL FROM:<x@y>\r\n.\r\n"


_LINE = st.binary(max_size=120).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"").lstrip(b" "))


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(_LINE, min_size=1, max_size=8),
       limit=st.sampled_from([2, 3, 7, 40, 998]), cuts=st.lists(st.integers(min_value=1), max_size=6))
def test_lines_past_smtp_line_length_limit_are_broken_and_nothing_else_changes(lines, limit, cuts):
    """Postfix's smtp_line_length_limit: each wire line at most *limit* bytes (one
    more for a stuffed dot), wherever the chunks end, and taking out every inserted
    CRLF SPACE (and the stuffed dots) gives the content back."""
    content = b"\r\n".join(lines) + b"\r\n"
    ends = sorted({c % len(content) for c in cuts} - {0}) + [len(content)]
    chunks = [content[a:b] for a, b in zip([0, *ends[:-1]], ends)]
    stuffer = DotStuffer(limit)
    wire = b"".join(stuffer.stuff(c) for c in chunks) + stuffer.finish()
    assert wire.endswith(b"\r\n.\r\n")
    sent = wire[:-3].split(b"\r\n")[:-1]
    assert all(len(line) <= limit + (line[:1] == b".") for line in sent), sent
    unstuffed = b"\r\n".join(line[1:] if line[:1] == b"." else line for line in sent) + b"\r\n"
    assert unstuffed.replace(b"\r\n ", b"") == content


@settings(max_examples=300, deadline=None)
@given(limit=st.sampled_from([509, 510, 511, 998]),
       lengths=st.lists(st.one_of(st.integers(0, 80), st.integers(-3, 3).map(lambda d: 998 + d),
                                  st.integers(400, 2100)), min_size=1, max_size=40),
       cuts=st.lists(st.integers(min_value=1), max_size=6))
def test_long_lines_near_a_real_limit_are_broken_wherever_they_lie(limit, lengths, cuts):
    """The same at limits whose lines the stuffer measures a block at a time: lines
    just under, at and just over the limit, and up to twice it, among short ones."""
    content = b"".join(bytes([0x61 + i % 26]) * n + b"\r\n" for i, n in enumerate(lengths))
    ends = sorted({c % len(content) for c in cuts} - {0}) + [len(content)]
    stuffer = DotStuffer(limit)
    wire = b"".join(stuffer.stuff(content[a:b]) for a, b in zip([0, *ends[:-1]], ends)) + stuffer.finish()
    sent = wire[:-3].split(b"\r\n")[:-1]
    assert max(map(len, sent)) <= limit
    assert b"\r\n".join(sent).replace(b"\r\n ", b"") + b"\r\n" == content
    assert len(sent) == len(lengths) + sum(max(0, -(-(n - limit) // (limit - 1))) for n in lengths)


def test_a_line_one_byte_over_the_limit_is_broken_wherever_it_starts():
    """Every alignment of the shortest line that must be broken (999 bytes at 998),
    after 0 to 1,000 bytes of short lines, in one chunk and cut after a CR."""
    for before in range(1001):
        short_lines = b"y" * 38 + b"\r\n"
        content = b"first\r\n" + short_lines * (before // 40) + b"f" * (before % 40) + b"\r\n"
        cut = len(content) - 1
        content += b"x" * 999 + b"\r\nshort\r\n"
        for chunks in ([content], [content[:cut], content[cut:]]):
            stuffer = DotStuffer(998)
            wire = b"".join(stuffer.stuff(c) for c in chunks) + stuffer.finish()
            assert max(map(len, wire.split(b"\r\n"))) <= 998, before


def test_without_a_limit_long_lines_pass_as_they_are():
    stuffer = DotStuffer()
    assert stuffer.stuff(b"x" * 5000 + b"\r\n") + stuffer.finish() == b"x" * 5000 + b"\r\n.\r\n"


def test_a_huge_reply_is_read_whole_but_only_its_first_text_is_kept():
    """Red team 39: a hostile server answered every RCPT with 1,000 lines of 4 KiB;
    each reply was held whole until the transaction ended (10 messages of 50
    recipients in flight took the qmgr to 2.35 GB).  The reply is still read to its
    end (the session stays in step), but at most MAX_REPLY_TEXT characters of its
    text are kept, whole lines only after the first."""
    from trimail.smtp.client import MAX_LINES

    parser = ReplyParser()
    line = b"550-5.1.1 " + b"x" * 3990 + b"\r\n"
    parser.feed(line * (MAX_LINES - 1) + b"550 5.1.1 no such user\r\n250 2.0.0 next\r\n")
    reply = parser.next_reply()
    assert reply is not None and reply.code == 550 and reply.enhanced == "5.1.1"
    kept = reply.lines()
    assert sum(map(len, kept)) <= 8192  # (held whole before: 4 MB)
    assert kept[0] == "x" * 3990 and all(text == "x" * 3990 for text in kept)
    following = parser.next_reply()
    assert following is not None and (following.code, following.enhanced) == (250, "2.0.0")


def test_ehlo_keywords_past_the_kept_text_are_dropped_whole_never_cut():
    parser = ReplyParser()
    filler = [b"250-X-FILLER" + b"y" * 1000 + b"\r\n"] * 7
    data = b"250-peer.example\r\n250-PIPELINING\r\n" + b"".join(filler) + b"250-Z" + b"z" * 700 + \
        b"\r\n250 SIZE 10240000\r\n"
    parser.feed(data)
    reply = parser.next_reply()
    assert reply is not None and sum(map(len, reply.lines())) <= 8192
    ext = Extensions.from_ehlo(reply)
    assert ext.has("PIPELINING") and ext.size_limit in (None, 10240000)
