"""Messages sent with BDAT reach the sink from trimail as they do from Postfix 3.7, byte
for byte but for trace headers: content normalised alike (dots kept, bare LF and stray
CR, CRLF cut between chunks, a last line without end, an empty message).  The replies
of these sessions (and of the BDAT errors) are compared by test_sessions.py; here they
run again with their own recipient, so that this check needs no other session."""

from __future__ import annotations

from tests.differential import chunking, harness
from tests.differential.test_sessions import compare, delivered

TO = "chunked@far.test"


def test_chunked_messages_reach_the_sink_as_from_postfix(pair):
    sessions = [s for s in chunking.sessions("bdat-sink", TO) if s.messages]
    for session in sessions:
        theirs = harness.run_session(harness.POSTFIX_HOST, pair.postfix.port, session.source, session.commands)
        ours = harness.run_session(harness.TRIMAIL_HOST, pair.trimail.port, session.source, session.commands)
        assert not compare(session, theirs, ours), session.name

    def mine(messages: list[harness.Arrived]) -> list:
        return [m for m in delivered(messages) if TO in m[1]]

    expected = sum(s.messages for s in sessions)
    harness.wait_until(lambda: len(mine(pair.sink.postfix_messages())) >= expected
                       and len(mine(pair.sink.trimail_messages())) >= expected, "the chunked messages", 60)
    theirs, ours = mine(pair.sink.postfix_messages()), mine(pair.sink.trimail_messages())
    assert len(ours) == expected
    assert ours == theirs
    assert any(b"\r\n.leading dot\r\n.\r\n..two dots\r\nbare\r\nline feeds\r\n\r\nstray carriage return here\r\n"
               b"last line, no end\r\n" in content for _, _, content in ours)
