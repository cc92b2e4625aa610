"""Property tests: arbitrary byte streams, split anywhere, never break the machine."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.smtp.driver import Driver
from trimail.smtp.events import BdatStart, Closed, DataAborted, DataChunk, DataEnd, DataStart, Event
from trimail.smtp.server import Settings

TOKENS = [
    b"EHLO client.example\r\n", b"HELO x\r\n", b"MAIL FROM:<a@example.org>\r\n",
    b"MAIL FROM:<a@example.org> SIZE=100\r\n", b"RCPT TO:<b@example.com>\r\n", b"DATA\r\n",
    b".\r\n", b"..\r\n", b"\r\n", b"\n", b"\r", b".", b"RSET\r\n", b"NOOP\r\n", b"QUIT\r\n",
    b"VRFY x\r\n", b"HELP\r\n", b"GET / HTTP/1.0\r\n", b"text line\r\n", b"\r\n.\n", b"\n.\r\n",
    b"BDAT 1\r\n", b"BDAT 3 LAST\r\n", b"BDAT 0 LAST\r\n", b"BDAT 0\r\n", b"BDAT 7\r\n", b"BDAT\r\n",
    b"\xff\xfe", b"\x00",
]
streams = st.lists(
    st.one_of(st.sampled_from(TOKENS), st.binary(max_size=40)), max_size=40
).map(b"".join)
small = Settings(line_length_limit=64, message_size_limit=200, recipient_limit=5, hard_error_limit=8)


def run(stream: bytes, cuts: list[int], config: Settings) -> Driver:
    d = Driver(config)
    positions = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    for start, end in zip(positions, positions[1:]):
        d.feed(stream[start:end])
    d.eof()
    return d


def normalized(events: list[Event]) -> list[object]:
    """Events with adjacent DataChunks merged (chunking depends on the split)."""
    out: list[object] = []
    for event in events:
        if isinstance(event, DataChunk) and out and isinstance(out[-1], bytes):
            out[-1] += event.data
        elif isinstance(event, DataChunk):
            out.append(event.data)
        else:
            out.append(event)
    return out


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(stream=streams, cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=12),
       config=st.sampled_from([Settings(), small, Settings(bare_newline="yes")]))
def test_any_stream_split_anywhere_gives_the_same_events_and_replies(stream, cuts, config):
    whole = run(stream, [], config)
    split = run(stream, cuts, config)
    assert normalized(split.events) == normalized(whole.events)
    assert split.output == whole.output


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(stream=streams, cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=12),
       config=st.sampled_from([Settings(), small]))
def test_only_answered_messages_are_accepted(stream, cuts, config):
    d = run(stream, cuts, config)
    # the session always ends, with exactly one Closed event last
    assert isinstance(d.events[-1], Closed)
    assert sum(isinstance(e, Closed) for e in d.events) == 1
    # content only flows between DataStart (or BDAT's first chunk) and its DataEnd/DataAborted
    inside = False
    for event in d.events:
        if isinstance(event, (DataStart, BdatStart)):
            assert not inside
            inside = True
        elif isinstance(event, DataChunk):
            assert inside
        elif isinstance(event, (DataEnd, DataAborted)):
            assert inside
            inside = False
    assert not inside
    # every completed message got its own queued reply, and nothing else says queued
    queued = [line for line in d.replies() if "queued as" in line]
    assert len(queued) == len(d.of_type(DataEnd)) == d.queued
    # the greeting and one reply per answered command; replies are well-formed
    for line in bytes(d.output).decode().split("\r\n")[:-1]:
        assert len(line) >= 4 and line[:3].isdigit() and line[3] in " -"


@settings(max_examples=200)
@given(body=st.binary(max_size=300))
def test_content_round_trips_through_dot_stuffing(body):
    # what a correct client sends: CRLF lines, leading dots doubled, CRLF.CRLF at the end
    lines = body.replace(b"\r", b"").split(b"\n")
    wire = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    d = Driver().feed(b"EHLO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n" + wire + b".\r\n")
    assert d.content() == b"".join(line + b"\r\n" for line in lines)
    assert len(d.of_type(DataEnd)) == 1
