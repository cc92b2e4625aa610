"""Red team (session 34): fault arguments that did something else than they say.
``slow(0)`` dropped the connection (a zero delay read as "no delay: drop"),
``slow(-1)`` cost the session a 451 internal error, and a pattern given for another
stage (``reject(stage="mail", rcpt="bob@*")``, ``reject(rcpt=..., sender=...)``) was
matched against the wrong address or silently ignored."""

from __future__ import annotations

import smtplib

import pytest

from trimail.testing import TestMTA

HOST = "127.0.34.159"


@pytest.fixture
def mta():
    with TestMTA(smtpd_listen=f"{HOST}:0") as mta:
        yield mta


def send(mta, sender="app@example.org", to=("ann@example.com",)):
    with smtplib.SMTP(HOST, mta.port, timeout=30) as client:
        return client.sendmail(sender, list(to), "Subject: hi\r\n\r\nx\r\n")


@pytest.mark.parametrize("stage", ["connect", "mail", "rcpt", "data", "end"])
def test_slow_by_zero_seconds_answers_normally(mta, stage):
    fault = mta.slow(0, stage=stage)
    assert send(mta) == {}
    mta.wait_for()
    assert fault.hits == 1 and mta.wait_for_attempts()[0].ended == "quit"


def test_a_negative_delay_is_refused_when_armed(mta):
    with pytest.raises(ValueError, match="0 or more"):
        mta.slow(-1)
    assert mta.faults == []


@pytest.mark.parametrize("arguments", [dict(stage="mail", rcpt="bob@*"), dict(rcpt="ann@*", sender="app@*"),
                                       dict(stage="rcpt", sender="app@*"), dict(stage="connect", user="app")])
def test_a_pattern_for_another_stage_is_refused(mta, arguments):
    with pytest.raises(ValueError, match="do not go together"):
        mta.reject(**arguments)
    assert mta.faults == []
    assert send(mta, sender="bob@example.org") == {}


def test_patterns_with_their_own_stage_still_work(mta):
    mta.reject(stage="rcpt", rcpt="gone@*")
    mta.defer(stage="mail", sender="flaky@*")
    assert send(mta, to=["gone@example.com", "ann@example.com"]) == {"gone@example.com": (550, b"5.1.1 Rejected by "
                                                                                              b"the test MTA")}
    with pytest.raises(smtplib.SMTPSenderRefused):
        send(mta, sender="flaky@example.org")


def test_starting_a_running_mta_again_starts_no_second_one():
    import socket

    with TestMTA(smtpd_listen=f"{HOST}:0").start() as mta:  # start(), then the with block's start()
        port, directory = mta.port, mta.directory
        assert mta.start() is mta and (mta.port, mta.directory) == (port, directory)
    with socket.socket() as probe:
        assert probe.connect_ex((HOST, port)) != 0  # nothing listens after stop()
    assert not directory.exists()
    mta.start()  # a stopped one starts again
    try:
        assert send(mta) == {} and mta.wait_for()
    finally:
        mta.stop()


@pytest.mark.parametrize("code", [250, 199, 354, 700, 99, "550"])
def test_a_fault_reply_code_that_is_no_refusal_is_refused_when_armed(mta, code):
    for arm in (lambda: mta.reject(rcpt="ann@*", code=code), lambda: mta.defer(sender="app@*", code=code),
                lambda: mta.defer_next(1, code=code)):
        with pytest.raises(ValueError, match="4xx or 5xx"):
            arm()
    assert mta.faults == []
    assert send(mta, to=["ann@example.com", "bob@example.com"]) == {}
    assert mta.wait_for()[0].recipients == ["ann@example.com", "bob@example.com"]


def test_an_option_value_of_two_lines_cannot_add_main_cf_parameters():
    with pytest.raises(ValueError, match="a main.cf value is one line"):
        TestMTA(smtpd_listen=f"{HOST}:0", myhostname="a.test\nsmtpd_banner = injected ESMTP").start()
