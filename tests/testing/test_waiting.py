"""wait_for_one, assert_not_sent_to, assert_nothing_sent(within=) and failure
messages that say, per captured message, which criterion it missed; sync and trio
forms against a real TestMTA, mail sent by smtplib."""

from __future__ import annotations

import smtplib
import threading

import pytest
import trio

from trimail.testing import MTAAssertionError, TestMTA, open_test_mta

HOST = "127.0.41.1"


def send(mta, subject="Welcome", rcpts=("ann@example.com",), sender="app@app.example"):
    with smtplib.SMTP(HOST, mta.port, timeout=30) as client:
        client.sendmail(sender, list(rcpts), f"Subject: {subject}\r\n\r\nHello\r\n")


@pytest.fixture
def mta():
    with TestMTA(smtpd_listen=f"{HOST}:0") as mta:
        yield mta


def test_wait_for_one_returns_the_one_message(mta):
    send(mta, "Welcome")
    send(mta, "Invoice")
    message = mta.wait_for_one(subject="Invoice")
    assert message.subject == "Invoice"


def test_wait_for_one_fails_listing_every_match_when_more_than_one_matches(mta):
    send(mta, "Welcome 1")
    send(mta, "Welcome 2")
    mta.wait_for(count=2)
    with pytest.raises(MTAAssertionError) as failure:
        mta.wait_for_one(subject="Welcome", timeout=5)
    text = str(failure.value)
    assert "expected one message matching {'subject': 'Welcome'}, 2 matched" in text
    assert "subject='Welcome 1': matches" in text and "subject='Welcome 2': matches" in text


def test_wait_for_one_fails_when_none_matches_in_time(mta):
    send(mta, "Welcome")
    with pytest.raises(MTAAssertionError) as failure:
        mta.wait_for_one(subject="Reset", timeout=0.2)
    assert "expected 1 message(s) matching {'subject': 'Reset'} within 0.2s" in str(failure.value)
    assert "1 message(s) arrived" in str(failure.value)


def test_failure_says_per_message_which_criterion_missed(mta):
    send(mta, "Welcome", rcpts=("bob@example.com",))
    send(mta, "Reset", rcpts=("ann@example.com",), sender="noreply@app.example")
    mta.wait_for(count=2)
    with pytest.raises(MTAAssertionError) as failure:
        mta.wait_for(subject="Reset", recipient="bob@example.com", sender="app@app.example", timeout=0.1)
    lines = str(failure.value).splitlines()
    assert "  from=<app@app.example> to=<bob@example.com> subject='Welcome': subject 'Reset' not in 'Welcome'" \
        in lines
    assert ("  from=<noreply@app.example> to=<ann@example.com> subject='Reset': "
            "recipient <bob@example.com> not among <ann@example.com>; "
            "sender <app@app.example> is not <noreply@app.example>") in lines


def test_failure_names_missing_headers_parts_and_attachments(mta):
    send(mta, "Plain")
    mta.wait_for()
    for match, reason in [({"header": ("X-Campaign", "spring")}, "no X-Campaign header"),
                          ({"html": "<b>"}, "html '<b>': the message has no HTML part"),
                          ({"attachment": ".pdf"}, "attachment '.pdf' not among no attachments"),
                          ({"text": "Bye"}, "text 'Bye' not in 'Hello'"),
                          ({"predicate": lambda m: False}, "predicate <lambda> is false")]:
        with pytest.raises(MTAAssertionError) as failure:
            mta.wait_for(timeout=0, **match)
        assert f"subject='Plain': {reason}" in str(failure.value)


def test_assert_not_sent_to(mta):
    send(mta, rcpts=("ann@example.com",))
    mta.wait_for()
    mta.assert_not_sent_to("bob@example.com", "zed@example.com")
    with pytest.raises(MTAAssertionError, match="expected no message to zed@example.com, ANN@example.com, 1 sent"):
        mta.assert_not_sent_to("zed@example.com", "ANN@example.com")


def test_assert_nothing_sent_within_fails_as_soon_as_a_message_arrives(mta):
    mta.assert_nothing_sent(within=0.2)  # quiet: passes after 0.2 s
    sent = threading.Event()

    def later():
        send(mta, "Late")
        sent.set()

    threading.Thread(target=later).start()
    with pytest.raises(MTAAssertionError, match="expected no messages") as failure:
        mta.assert_nothing_sent(within=30)
    assert "subject='Late'" in str(failure.value)
    assert sent.wait(30)


def test_assert_nothing_sent_without_within_checks_now(mta):
    mta.assert_nothing_sent()
    send(mta)
    mta.wait_for()
    with pytest.raises(MTAAssertionError):
        mta.assert_nothing_sent()


async def test_trio_form_wait_for_one_and_nothing_sent_within():
    async with open_test_mta(smtpd_listen=f"{HOST}:0") as mta:
        mta.assert_nothing_sent()  # no await needed without within
        await mta.assert_nothing_sent()  # but it may be awaited
        await mta.assert_nothing_sent(within=0.1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, send, mta, "Late")
            with pytest.raises(MTAAssertionError, match="expected no messages"):
                await mta.assert_nothing_sent(within=30)
        assert (await mta.wait_for_one(subject="Late")).subject == "Late"
        await trio.to_thread.run_sync(send, mta, "Late again")
        await mta.wait_for(count=2)
        with pytest.raises(MTAAssertionError, match="2 matched"):
            await mta.wait_for_one(subject="Late")
        with pytest.raises(MTAAssertionError, match="subject 'Nope' not in 'Late'"):
            await mta.wait_for_one(subject="Nope", timeout=0.05)
        mta.assert_not_sent_to("bob@example.com")


def test_a_slow_predicate_holds_up_no_test_mta():
    """Red team 34: wait_for ran its criteria holding the MTA's lock, so while a slow
    ``predicate`` ran, the event-loop thread every sync TestMTA shares blocked on that
    lock as soon as the MTA recorded anything (a new session): every other test MTA
    in the process stopped answering.  The predicate now runs without the lock."""
    entered, release = threading.Event(), threading.Event()

    def slow(message) -> bool:
        entered.set()
        release.wait(30)  # a predicate that takes its time (parsing, a lookup, a breakpoint)
        return "Second" in message.subject

    with TestMTA(smtpd_listen=f"{HOST}:0") as first, TestMTA(smtpd_listen="127.0.41.2:0") as other:
        send(first, "First")
        found: list = []
        waiter = threading.Thread(target=lambda: found.extend(first.wait_for(predicate=slow, timeout=60)))
        waiter.start()
        try:
            assert entered.wait(10)
            # while the predicate runs: this MTA records a session and a message, the other answers
            for port, subject in ((first.port, "Second"), (other.port, "Other")):
                with smtplib.SMTP(HOST if subject == "Second" else "127.0.41.2", port, timeout=10) as client:
                    client.sendmail("app@app.example", ["ann@example.com"], f"Subject: {subject}\r\n\r\nHi\r\n")
            assert other.wait_for_one(subject="Other", timeout=10)
        finally:
            release.set()
            waiter.join(30)
        assert [m.subject for m in found] == ["Second"]  # the capture during the predicate was seen
