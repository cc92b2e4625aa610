"""BDAT (RFC 3030 CHUNKING) in the sans-IO server machine: Postfix's replies and order of
checks (smtpd.c's bdat_cmd and skip_bdat), content as DATA's, any chunking and any split
of the byte stream giving the same message, and bounded memory for any declared size."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.smtp.driver import Driver
from trimail.smtp import replies
from trimail.smtp.bdat import PIECE
from trimail.smtp.events import BdatStart, ChunkEnd, Closed, DataAborted, DataChunk, DataEnd, Reset
from trimail.smtp.server import Settings
from trimail.smtp.states import State

EHLO = b"EHLO client.example\r\n"
MAIL = b"MAIL FROM:<sender@example.org>\r\n"
RCPT = b"RCPT TO:<rcpt@example.com>\r\n"
START = EHLO + MAIL + RCPT


def bdat(chunks: list[bytes]) -> bytes:
    """The BDAT commands for *chunks*, the last one with LAST."""
    out = b""
    for i, chunk in enumerate(chunks):
        out += b"BDAT %d%s\r\n" % (len(chunk), b" LAST" if i == len(chunks) - 1 else b"") + chunk
    return out


def stuffed(content: bytes) -> bytes:
    """*content* as DATA sends it: a dot doubled at the start of each line, then the end."""
    if content.endswith(b"\r\n"):
        pass
    elif content.endswith(b"\n"):
        content = content[:-1] + b"\r\n"
    elif content:
        content += b"\r\n"
    lines = content.split(b"\n")
    return b"\n".join(b"." + line if line.startswith(b".") else line for line in lines) + b".\r\n"


def test_chunks_are_answered_with_their_size_and_the_end_with_the_messages():
    d = Driver().feed(START + bdat([b"Subject: t\r\n", b"\r\nhello\r\n"]) + b"QUIT\r\n")
    assert d.replies()[-3:] == ["250 2.0.0 Ok: 12 bytes", "250 2.0.0 Ok: 21 bytes queued as ID1", "221 2.0.0 Bye"]
    assert d.content() == b"Subject: t\r\n\r\nhello\r\n"
    kinds = [type(e) for e in d.events[3:]]
    assert kinds == [BdatStart, DataChunk, ChunkEnd, DataChunk, DataEnd, Closed]
    assert d.conn.command_stats["bdat"] == 2 and d.conn.command_stats["bdat/ok"] == 2


def test_content_is_not_unstuffed_and_a_last_line_without_end_gets_crlf():
    d = Driver().feed(START + bdat([b"..x\r\n.\r\n.", b"\r\nend"]))
    assert d.content() == b"..x\r\n.\r\n.\r\nend\r\n"
    assert d.replies()[-1] == "250 2.0.0 Ok: 16 bytes queued as ID1"


def test_bare_lf_and_stray_cr_are_normalised_as_data_does_even_across_chunks():
    d = Driver().feed(START + bdat([b"a\nb\r", b"\nc\rd\r", b""]))
    assert d.content() == b"a\r\nb\r\nc d \r\n"


def test_an_empty_message_is_bdat_0_last():
    d = Driver().feed(START + b"BDAT 0 LAST\r\n")
    assert d.replies()[-1] == "250 2.0.0 Ok: 0 bytes queued as ID1" and d.content() == b""
    assert d.conn.state is State.READY


def test_bdat_0_without_last_is_refused_and_later_chunks_are_dropped():
    d = Driver().feed(START + b"BDAT 0\r\nBDAT 3\r\nabcDATA\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n"
                      b"BDAT 2 LAST\r\nxyNOOP\r\n")
    assert d.replies()[4:] == ["551 5.7.1 Null BDAT request", "551 5.0.0 Discarded 3 bytes after earlier error",
                               "503 5.5.1 Error: DATA after BDAT", "503 5.5.1 Error: nested MAIL command",
                               "503 5.5.1 Error: RCPT after BDAT", "551 5.0.0 Discarded 2 bytes after earlier error",
                               "250 2.0.0 Ok"]
    assert not d.of_type(DataChunk) and d.of_type(Reset) and d.conn.state is State.READY


def test_bdat_without_a_transaction():
    d = Driver().feed(EHLO + b"BDAT 3\r\nabcMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\nRSET\r\n"
                      + MAIL + b"BDAT 1 LAST\r\nx" + RCPT)
    assert d.replies()[2:] == ["503 5.5.1 Error: need RCPT command", "503 5.5.1 Error: MAIL after BDAT",
                               "503 5.5.1 Error: need MAIL command", "503 5.5.1 Error: DATA after BDAT",
                               "250 2.0.0 Ok", "250 2.1.0 Ok", "554 5.5.1 Error: no valid recipients",
                               "503 5.5.1 Error: need MAIL command"]  # LAST ended the transaction


def test_data_after_bdat_and_bdat_after_data():
    d = Driver().feed(START + b"BDAT 2\r\nabDATA\r\nRCPT TO:<x@y.example>\r\nMAIL FROM:<a@b.example>\r\n"
                      b"BDAT 1 LAST\r\nc")
    assert d.replies()[4:] == ["250 2.0.0 Ok: 2 bytes", "503 5.5.1 Error: DATA after BDAT",
                               "503 5.5.1 Error: RCPT after BDAT", "503 5.5.1 Error: nested MAIL command",
                               "250 2.0.0 Ok: 5 bytes queued as ID1"]
    d.feed(b"BDAT 1 LAST\r\nx" + MAIL + RCPT + b"DATA\r\nhi\r\n.\r\n")
    assert d.replies()[-5:] == ["503 5.5.1 Error: need RCPT command", "250 2.1.0 Ok", "250 2.1.5 Ok",
                                "354 End data with <CR><LF>.<CR><LF>", "250 2.0.0 Ok: queued as ID2"]


def test_rset_and_ehlo_end_a_bdat_transaction():
    for reset in (b"RSET\r\n", EHLO):
        d = Driver().feed(START + b"BDAT 2\r\nab" + reset + MAIL + RCPT + bdat([b"new\r\n"]))
        assert d.replies()[-5:-3] == ["250 2.0.0 Ok: 2 bytes", "250 2.0.0 Ok" if reset == b"RSET\r\n" else "250 CHUNKING"]
        assert d.replies()[-1] == "250 2.0.0 Ok: 5 bytes queued as ID1"
        assert [e.data for e in d.of_type(DataChunk)] == [b"ab", b"new\r\n"]


def test_malformed_bdat_ends_the_session():
    for arg in (b"", b" x", b" -1", b" +1", b" 1 LAST x", b" 1 FIRST", b" 99999999999999999999", b" \xc2\xb2"):
        d = Driver().feed(START + b"BDAT" + arg + b"\r\nabc")
        assert d.replies()[-1] == "521 5.5.4 Syntax: BDAT count [LAST]", arg
        assert d.closed


def test_last_is_case_insensitive_and_tabs_separate():
    d = Driver().feed(START + b"bdat\t1   last\r\nx")
    assert d.replies()[-1] == "250 2.0.0 Ok: 3 bytes queued as ID1"


def test_discarded_chunking_is_not_offered_and_bdat_ends_the_session():
    d = Driver(Settings(chunking=False, discard_ehlo=frozenset({"CHUNKING"}))).feed(START + b"BDAT 1 LAST\r\nx")
    assert "250-CHUNKING" not in d.replies() and b"CHUNKING" not in bytes(d.output)
    assert d.replies()[-1] == "521 5.5.1 Error: command not implemented" and d.closed


def test_a_chunk_past_the_size_limit_is_refused_before_it_is_read():
    d = Driver(Settings(message_size_limit=100)).feed(START + b"BDAT 60\r\n" + b"x" * 58 + b"\r\nBDAT 41\r\n")
    assert d.replies()[-1] == "250 2.0.0 Ok: 60 bytes"
    d.feed(b"y" * 41)
    assert d.replies()[-1] == "552 5.3.4 Chunk exceeds message size limit"
    assert d.of_type(DataAborted) and d.conn.state is State.RCPT
    d.feed(b"BDAT 5 LAST\r\nzzzzz" + MAIL)
    assert d.replies()[-2:] == ["551 5.0.0 Discarded 5 bytes after earlier error", "250 2.1.0 Ok"]


def test_a_line_counts_toward_the_limit_when_it_ends_as_in_postfix():
    # 60 bytes of lines and 20 of a line not ended yet: Postfix counts 60, so a chunk of 30
    # is taken, and the message is too big once its lines end (Postfix's act_size)
    d = Driver(Settings(message_size_limit=100)).feed(
        START + b"BDAT 80\r\n" + b"a\r\n" * 20 + b"b" * 20 + b"BDAT 30 LAST\r\n" + b"b" * 10 + b"\r\n" + b"c" * 18)
    assert d.replies()[-2:] == ["250 2.0.0 Ok: 80 bytes", "552 5.3.4 Error: message file too big"]
    d = Driver(Settings(message_size_limit=200, line_length_limit=40)).feed(
        START + b"BDAT 150\r\n" + b"a\r\n" * 20 + b"b" * 90 + b"BDAT 70\r\n" + b"b" * 70)
    assert d.replies()[-1] == "552 5.3.4 Chunk exceeds message size limit"  # 60 + 80 of the long line


def test_content_grown_past_the_limit_by_its_line_ends_is_message_file_too_big():
    d = Driver(Settings(message_size_limit=10)).feed(START + b"BDAT 10\r\n" + b"a\n" * 5 + b"BDAT 1 LAST\r\nx")
    assert d.replies()[-2:] == ["552 5.3.4 Error: message file too big",
                                "551 5.0.0 Discarded 1 bytes after earlier error"]
    assert d.content() == b"" and d.of_type(DataAborted)


def test_bare_lf_rejected_after_the_chunk():
    d = Driver(Settings(bare_newline="reject")).feed(START + bdat([b"a\nb\r\n", b"c\r\n"]) + b"NOOP\r\n")
    assert d.replies()[-3:] == ["550 5.5.2 localhost Error: bare <LF> received",
                                "551 5.0.0 Discarded 3 bytes after earlier error", "250 2.0.0 Ok"]
    assert not d.of_type(DataEnd)
    d = Driver(Settings(bare_newline="reject", bare_newline_code=521)).feed(START + bdat([b"a\n"]) + b"NOOP\r\n")
    assert d.replies()[-1] == "521 5.5.2 localhost Error: bare <LF> received" and d.closed


def test_a_refused_first_chunk_is_read_then_refused():
    refusal = replies.Reply(554, "5.7.1", "<unknown[192.0.2.1]>: Client host rejected: no")
    d = Driver(decide=lambda e: refusal if isinstance(e, BdatStart) else None)
    d.feed(START + b"BDAT 5\r\nab")
    assert d.replies()[-1] == "250 2.1.5 Ok"  # not before the chunk's bytes are read
    d.feed(b"c\r\nBDAT 2 LAST\r\nxy" + RCPT)
    assert d.replies()[-3:] == [str(refusal), "551 5.0.0 Discarded 2 bytes after earlier error",
                                "503 5.5.1 Error: need MAIL command"]
    assert not d.of_type(DataChunk)


def test_a_refused_chunk_voids_the_message():
    failure = replies.LOCAL_ERROR
    d = Driver(decide=lambda e: failure if isinstance(e, ChunkEnd) else None)
    d.feed(START + bdat([b"ab", b"cd", b"ef"]))
    assert d.replies()[-3:] == ["451 4.3.0 Error: queue file write error",
                                "551 5.0.0 Discarded 2 bytes after earlier error",
                                "551 5.0.0 Discarded 2 bytes after earlier error"]
    assert d.of_type(DataAborted) and not d.of_type(DataEnd)


def test_too_much_content_to_drop_ends_the_session_at_once():
    d = Driver(Settings(message_size_limit=1000)).feed(START + b"BDAT 10000000000 LAST\r\n")
    assert d.replies()[-1] == "552 5.3.4 Chunk exceeds message size limit" and d.closed
    d = Driver(Settings(message_size_limit=1000)).feed(EHLO + b"BDAT 1400\r\n" + b"x" * 1400 + b"BDAT 200\r\n")
    assert d.replies()[-2:] == ["503 5.5.1 Error: need RCPT command",
                                "551 5.0.0 Discarded 200 bytes after earlier error"]  # 1600 > 1.5 * 1000
    assert d.closed


def test_a_huge_chunk_is_streamed_in_bounded_pieces():
    d = Driver(Settings(message_size_limit=0)).feed(START + b"BDAT 10000000000 LAST\r\n")
    line = b"x" * 998 + b"\r\n"
    for _ in range(300):
        d.feed(line * 100)
        assert len(d.conn._in) == 0
    chunks = d.of_type(DataChunk)
    assert sum(len(c.data) for c in chunks) == 300 * 100 * 1000
    assert max(len(c.data) for c in chunks) <= PIECE and d.conn.state is State.BDAT


def test_eof_in_a_chunk_aborts_the_message():
    d = Driver().feed(START + b"BDAT 10\r\nabc").eof()
    assert d.of_type(DataAborted) and d.closed


def test_connection_closed_by_the_server_in_a_chunk_aborts_the_message():
    d = Driver().feed(START + b"BDAT 10\r\nabc")
    d.conn.close(replies.timeout("localhost"), "timeout")
    assert d.conn.next_event() == DataAborted("timeout")


# -- properties ----------------------------------------------------------------------

CONTENT = st.lists(st.sampled_from([b"a", b"Subject: x", b".", b"..", b" ", b"\r", b"\n", b"\r\n", b"\xff"]),
                   max_size=60).map(b"".join)


@st.composite
def chunked(draw):
    content = draw(CONTENT)
    cuts = sorted(draw(st.lists(st.integers(0, len(content)), max_size=6)))
    bounds = [0, *cuts, len(content)]
    pieces = [content[a:b] for a, b in zip(bounds, bounds[1:])]
    return content, [p for p in pieces[:-1] if p] + pieces[-1:]  # BDAT 0 is refused but with LAST


def machine_content(wire: bytes, splits: list[int] = ()) -> tuple[bytes, list[str]]:
    d = Driver()
    last = 0
    for at in sorted(splits):
        d.feed(wire[last:at])
        last = at
    d.feed(wire[last:])
    return d.content(), d.replies()


@settings(max_examples=300, deadline=None)
@given(chunked())
def test_bdat_and_data_store_the_same_content(case):
    content, chunks = case
    by_bdat, bdat_replies = machine_content(START + bdat(chunks))
    by_data, data_replies = machine_content(START + b"DATA\r\n" + stuffed(content))
    assert by_bdat == by_data, (chunks, by_bdat, by_data)
    assert bdat_replies[-1] == f"250 2.0.0 Ok: {len(by_bdat)} bytes queued as ID1"
    assert data_replies[-1] == "250 2.0.0 Ok: queued as ID1"
    assert b"\r" not in by_bdat.replace(b"\r\n", b"") and b"\n" not in by_bdat.replace(b"\r\n", b"")


@settings(max_examples=300, deadline=None)
@given(chunked(), st.data())
def test_any_split_of_the_byte_stream_gives_the_same_session(case, data):
    content, chunks = case
    wire = START + bdat(chunks) + b"BDAT 0\r\nBDAT 3 LAST\r\nabc" + MAIL + RCPT + bdat(chunks) + b"QUIT\r\n"
    whole = machine_content(wire)
    splits = data.draw(st.lists(st.integers(0, len(wire)), max_size=12))
    assert machine_content(wire, splits) == whole
    assert machine_content(wire, list(range(len(wire)))) == whole  # a byte at a time
