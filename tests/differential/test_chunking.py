"""Messages sent with BDAT reach the sink from trimail as they do from Postfix 3.7, byte
for byte but for trace headers: content normalised alike (dots kept, bare LF and stray
CR, CRLF cut between chunks, a last line without end, an empty message).  The replies
of these sessions (and of the BDAT errors) are compared by test_sessions.py; here they
run again with their own recipient, so that this check needs no other session.

Then BDAT under settings the shared pair does not have, each given to a Postfix and a
trimail of their own (sharing the pair's DNS server and sink): bare LFs refused
(smtpd_forbid_bare_newline = reject), CHUNKING discarded, the first BDAT refused by
smtpd_data_restrictions, reject_unauth_pipelining.  Every reply must be Postfix's."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from tests.differential import chunking, harness, scenario
from tests.differential.sessions import INSIDE, Session
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


START = ["EHLO client.test", "MAIL FROM:<a@client.test>", "RCPT TO:<settings@far.test>"]
HEADERS = chunking.headers("bdat-settings", "settings@far.test")
SETTINGS_SESSIONS = [
    [*START, "CHUNKS:" + chunking.bdat("ab\ncd", "ef\r\n", "xyz"), "NOOP", "MAIL FROM:<a@client.test>", "QUIT"],
    [*START, "CHUNKS:" + chunking.bdat("ab\nc"), "NOOP", "QUIT"],
    [*START, "CHUNKS:" + chunking.bdat(HEADERS + "\r\nab\rcd", "xyz"), "QUIT"],
]


@pytest.mark.parametrize("setting", [
    "smtpd_forbid_bare_newline = reject\nsmtpd_forbid_bare_newline_exclusions =",
    "smtpd_discard_ehlo_keywords = chunking",
    "smtpd_data_restrictions = reject",
    "smtpd_data_restrictions = reject_unauth_pipelining",
])
def test_bdat_under_other_settings_as_postfix(pair, setting):
    workdir = Path(tempfile.mkdtemp(prefix="trimail-differential-bdat-"))  # Postfix's user must reach it
    main_cf = scenario.MAIN_CF + setting + "\n"
    postfix = trimail = None
    try:
        postfix = harness.PrivatePostfix(workdir / "postfix", main_cf, scenario.TABLES, pair.sink.port)
        trimail = harness.Trimail(workdir / "trimail", main_cf, scenario.TABLES, pair.sink.port)
        for i, commands in enumerate(SETTINGS_SESSIONS):
            session = Session(f"bdat-settings-{i}", INSIDE, commands)
            theirs = harness.run_session(harness.POSTFIX_HOST, postfix.port, INSIDE, commands)
            ours = harness.run_session(harness.TRIMAIL_HOST, trimail.port, INSIDE, commands)
            problems = compare(session, theirs, ours)
            assert not problems, f"{setting}, session {i}:\n" + "\n".join(problems)
        harness.wait_until(lambda: postfix.queue_empty() and trimail.queue_empty(), "both queues to drain", 60)
    finally:
        for mta in (trimail, postfix):
            if mta is not None:
                mta.stop()
        shutil.rmtree(workdir, ignore_errors=True)
