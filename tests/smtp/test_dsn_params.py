"""The DSN parameters (RFC 3461) at the server machine: what is accepted, and Postfix's
replies (smtpd.c mail_cmd/rcpt_cmd) to what is not."""

from __future__ import annotations

import pytest

from tests.smtp.driver import Driver
from trimail.smtp.events import MailFrom, RcptTo
from trimail.smtp.server import Settings

EHLO = b"EHLO client.example\r\n"
MAIL = b"MAIL FROM:<sender@example.org>\r\n"


def test_ehlo_offers_dsn_and_smtpd_discard_ehlo_keywords_hides_it():
    assert "250-DSN\r\n" in bytes(Driver().feed(EHLO).output).decode()
    hidden = bytes(Driver(Settings(dsn=False, discard_ehlo=frozenset({"DSN", "VRFY"}))).feed(EHLO).output).decode()
    assert "DSN" not in hidden and "VRFY" not in hidden and "250-PIPELINING" in hidden


@pytest.mark.parametrize("params", [
    b"RET=FULL", b"RET=hdrs", b"ENVID=QQ314159", b"ENVID=a+2Bb+3Dc", b"RET=HDRS ENVID=x+20y SIZE=10",
    b"ENVID=" + b"x" * 100, b"ENVID=" + b"+41" * 100,  # 100 characters once decoded
])
def test_mail_takes_ret_and_envid(params):
    d = Driver().feed(EHLO + b"MAIL FROM:<sender@example.org> " + params + b"\r\n")
    assert d.replies()[-1] == "250 2.1.0 Ok"
    assert isinstance(d.events[-1], MailFrom)


@pytest.mark.parametrize("params, reply", [
    (b"RET=PARTIAL", "501 5.5.4 Bad RET parameter syntax"),
    (b"RET=FULL RET=HDRS", "501 5.5.4 Bad RET parameter syntax"),  # a duplicate, as Postfix
    (b"RET=FULL RET=FULL", "501 5.5.4 Bad RET parameter syntax"),
    (b"RET", "501 5.5.4 Bad RET parameter syntax"),
    (b"ENVID=a+2", "501 5.5.4 Bad ENVID parameter syntax"),
    (b"ENVID=a+zz", "501 5.5.4 Bad ENVID parameter syntax"),
    (b"ENVID=a+0Ab", "501 5.5.4 Bad ENVID parameter syntax"),  # a line break once decoded
    (b"ENVID=a+00b", "501 5.5.4 Bad ENVID parameter syntax"),
    (b"ENVID=x ENVID=y", "501 5.5.4 Bad ENVID parameter syntax"),
    (b"ENVID=" + b"x" * 101, "501 5.5.4 Bad ENVID parameter syntax"),  # RFC 3461 4.4: 100 at most
    (b"NOTIFY=NEVER", "555 5.5.4 Unsupported option: NOTIFY=NEVER"),  # a RCPT parameter
])
def test_mail_refuses_bad_dsn_parameters_with_postfix_replies(params, reply):
    d = Driver().feed(EHLO + b"MAIL FROM:<sender@example.org> " + params + b"\r\n")
    assert d.replies()[-1] == reply


@pytest.mark.parametrize("params", [
    b"NOTIFY=NEVER", b"NOTIFY=never", b"NOTIFY=SUCCESS,FAILURE,DELAY", b"NOTIFY=delay,success",
    b"NOTIFY=FAILURE ORCPT=rfc822;a+2Bb@example.com", b"ORCPT=rfc822;user@example.com",
    b"ORCPT=utf-8;j\\x{F6}rg@example.com", b"ORCPT=x-local;" + b"a" * 492,  # 500 characters in all
])
def test_rcpt_takes_notify_and_orcpt(params):
    d = Driver().feed(EHLO + MAIL + b"RCPT TO:<rcpt@example.com> " + params + b"\r\n")
    assert d.replies()[-1] == "250 2.1.5 Ok"
    assert isinstance(d.events[-1], RcptTo)


@pytest.mark.parametrize("params, reply", [
    (b"NOTIFY=NEVER,SUCCESS", "501 5.5.4 Error: Bad NOTIFY parameter syntax"),
    (b"NOTIFY=SOMETIMES", "501 5.5.4 Error: Bad NOTIFY parameter syntax"),
    (b"NOTIFY=SUCCESS NOTIFY=FAILURE", "501 5.5.4 Error: Bad NOTIFY parameter syntax"),
    (b"NOTIFY=,", "501 5.5.4 Error: Bad NOTIFY parameter syntax"),
    (b"ORCPT=user@example.com", "501 5.5.4 Error: Bad ORCPT parameter syntax"),  # no address type
    (b"ORCPT=;user@example.com", "501 5.5.4 Error: Bad ORCPT parameter syntax"),
    (b"ORCPT=rfc822;a+0D+0Abcc:x@example.com", "501 5.5.4 Error: Bad ORCPT parameter syntax"),
    (b"ORCPT=rfc822;a+4", "501 5.5.4 Error: Bad ORCPT parameter syntax"),
    (b"ORCPT=utf-8;a\\x{110000}", "501 5.5.4 Error: Bad ORCPT parameter syntax"),
    (b"ORCPT=rfc822;a ORCPT=rfc822;b", "501 5.5.4 Error: Bad ORCPT parameter syntax"),
    (b"ORCPT=x-local;" + b"a" * 493, "501 5.5.4 Error: Bad ORCPT parameter syntax"),  # RFC 3461 4.2: 500
    (b"RET=FULL", "555 5.5.4 Unsupported option: RET=FULL"),  # a MAIL parameter
])
def test_rcpt_refuses_bad_dsn_parameters_with_postfix_replies(params, reply):
    d = Driver().feed(EHLO + MAIL + b"RCPT TO:<rcpt@example.com> " + params + b"\r\n")
    assert d.replies()[-1] == reply


@pytest.mark.parametrize("command", [
    b"MAIL FROM:<sender@example.org> RET=FULL", b"MAIL FROM:<sender@example.org> ENVID=x",
])
def test_dsn_parameters_refused_when_dsn_is_discarded(command):
    d = Driver(Settings(dsn=False, discard_ehlo=frozenset({"DSN"}))).feed(EHLO + command + b"\r\n")
    assert d.replies()[-1] == "501 5.7.1 DSN support is disabled"


def test_rcpt_dsn_parameters_refused_when_dsn_is_discarded():
    d = Driver(Settings(dsn=False)).feed(EHLO + MAIL + b"RCPT TO:<r@example.com> NOTIFY=NEVER\r\n"
                                         + b"RCPT TO:<r@example.com> ORCPT=rfc822;r@example.com\r\n")
    assert d.replies()[-2:] == ["501 5.7.1 DSN support is disabled"] * 2
