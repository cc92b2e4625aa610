"""The sans-IO SMTP server machine: every command in every state, limits, DATA rules."""

from __future__ import annotations

import pytest

from tests.smtp.driver import Driver
from trimail.smtp import replies
from trimail.smtp.events import (
    NEED_DATA,
    Closed,
    DataAborted,
    DataEnd,
    Hello,
    MailFrom,
    RcptTo,
    Reset,
)
from trimail.smtp.replies import Reply
from trimail.smtp.server import ServerConnection, Settings
from trimail.smtp.states import LocalProtocolError, State

EHLO = b"EHLO client.example\r\n"
MAIL = b"MAIL FROM:<sender@example.org>\r\n"
RCPT = b"RCPT TO:<rcpt@example.com>\r\n"


def test_golden_dialogue_with_pipelining():
    d = Driver(Settings(hostname="mx.example.com", banner="mx.example.com ESMTP trimail"))
    d.feed(EHLO + MAIL + RCPT + b"DATA\r\n" + b"Subject: t\r\n\r\nhello\r\n.\r\n" + b"QUIT\r\n")
    assert bytes(d.output).decode() == (
        "220 mx.example.com ESMTP trimail\r\n"
        "250-mx.example.com\r\n"
        "250-PIPELINING\r\n"
        "250-SIZE 10240000\r\n"
        "250-VRFY\r\n"
        "250-ENHANCEDSTATUSCODES\r\n"
        "250-8BITMIME\r\n"
        "250-DSN\r\n"
        "250-SMTPUTF8\r\n"
        "250 CHUNKING\r\n"
        "250 2.1.0 Ok\r\n"
        "250 2.1.5 Ok\r\n"
        "354 End data with <CR><LF>.<CR><LF>\r\n"
        "250 2.0.0 Ok: queued as ID1\r\n"
        "221 2.0.0 Bye\r\n"
    )
    assert d.content() == b"Subject: t\r\n\r\nhello\r\n"
    assert isinstance(d.events[-1], Closed)


# The first reply code each command gets in each state.
PREFIX = {
    State.INIT: b"",
    State.READY: EHLO,
    State.MAIL: EHLO + MAIL,
    State.RCPT: EHLO + MAIL + RCPT,
}
COMMANDS = {
    "HELO": (b"HELO client.example\r\n", {State.INIT: 250, State.READY: 250, State.MAIL: 250, State.RCPT: 250}),
    "EHLO": (EHLO, {State.INIT: 250, State.READY: 250, State.MAIL: 250, State.RCPT: 250}),
    "MAIL": (MAIL, {State.INIT: 250, State.READY: 250, State.MAIL: 503, State.RCPT: 503}),
    "RCPT": (RCPT, {State.INIT: 503, State.READY: 503, State.MAIL: 250, State.RCPT: 250}),
    "DATA": (b"DATA\r\n", {State.INIT: 503, State.READY: 503, State.MAIL: 554, State.RCPT: 354}),
    "RSET": (b"RSET\r\n", {s: 250 for s in PREFIX}),
    "NOOP": (b"NOOP\r\n", {s: 250 for s in PREFIX}),
    "QUIT": (b"QUIT\r\n", {s: 221 for s in PREFIX}),
    "VRFY": (b"VRFY root\r\n", {s: 252 for s in PREFIX}),
    "HELP": (b"HELP\r\n", {s: 214 for s in PREFIX}),
    "EXPN": (b"EXPN list\r\n", {s: 502 for s in PREFIX}),
    "BDAT": (b"BDAT 0 LAST\r\n", {State.INIT: 503, State.READY: 503, State.MAIL: 554, State.RCPT: 250}),
    "unknown": (b"FROB x\r\n", {s: 500 for s in PREFIX}),
}
NEXT_STATE = {
    "HELO": {s: State.READY for s in PREFIX},
    "EHLO": {s: State.READY for s in PREFIX},
    "MAIL": {State.INIT: State.MAIL, State.READY: State.MAIL, State.MAIL: State.MAIL, State.RCPT: State.RCPT},
    "RCPT": {State.INIT: State.INIT, State.READY: State.READY, State.MAIL: State.RCPT, State.RCPT: State.RCPT},
    "DATA": {State.INIT: State.INIT, State.READY: State.READY, State.MAIL: State.MAIL, State.RCPT: State.DATA},
    "RSET": {State.INIT: State.INIT, State.READY: State.READY, State.MAIL: State.READY, State.RCPT: State.READY},
    "BDAT": {State.INIT: State.INIT, State.READY: State.READY, State.MAIL: State.READY, State.RCPT: State.READY},
    "QUIT": {s: State.CLOSED for s in PREFIX},
}


@pytest.mark.parametrize("state", list(PREFIX), ids=lambda s: s.value)
@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_in_every_state(state, command):
    d = Driver()
    d.feed(PREFIX[state])
    assert d.conn.state is state
    before = len(d.codes())
    line, expected = COMMANDS[command]
    d.feed(line)
    assert d.codes()[before] == expected[state], d.replies()
    assert d.conn.state is NEXT_STATE.get(command, {}).get(state, state)


def test_helo_required_refuses_mail_before_helo():
    d = Driver(Settings(helo_required=True)).feed(MAIL)
    assert d.replies()[-1] == "503 5.5.1 Error: send HELO/EHLO first"


def test_commands_inside_data_are_message_content():
    d = Driver().feed(EHLO + MAIL + RCPT + b"DATA\r\nQUIT\r\nRSET\r\nMAIL FROM:<x@y.z>\r\n.\r\n")
    assert d.codes() == [220, 250, 250, 250, 354, 250]
    assert d.content() == b"QUIT\r\nRSET\r\nMAIL FROM:<x@y.z>\r\n"
    assert d.conn.state is State.READY


def test_ehlo_resets_a_transaction():
    d = Driver().feed(EHLO + MAIL + RCPT + EHLO + b"DATA\r\n")
    assert d.codes()[-1] == 503
    assert d.conn.recipient_count == 0


def test_rset_reports_reset_only_with_a_transaction():
    d = Driver().feed(EHLO + b"RSET\r\n" + MAIL + b"RSET\r\n")
    assert len(d.of_type(Reset)) == 1


@pytest.mark.parametrize(
    "line, code, enhanced",
    [
        (b"MAIL FROM:sender@example.org\r\n", 250, "2.1.0"),  # Postfix tolerates missing brackets
        (b"MAIL FROM: <sender@example.org>\r\n", 250, "2.1.0"),
        (b"MAIL FROM:<>\r\n", 250, "2.1.0"),
        (b"MAIL FROM:<@relay.example:sender@example.org>\r\n", 250, "2.1.0"),
        (b"MAIL FROM:<sender@example.org> SIZE=1000 BODY=8BITMIME\r\n", 250, "2.1.0"),
        (b"MAIL TO:<sender@example.org>\r\n", 501, "5.5.4"),
        (b"MAIL FROM:<sender@example.org\r\n", 501, "5.1.7"),  # Postfix: Bad sender address syntax
        (b"MAIL FROM:<sender@@example.org>\r\n", 501, "5.1.7"),
        (b"MAIL FROM:<sender@exa_mple..org>\r\n", 501, "5.1.7"),
        (b"MAIL FROM:<sender>\r\n", 250, "2.1.0"),  # Postfix: qualified later, user@$myorigin
        (b"MAIL FROM:<\"s e\">\r\n", 250, "2.1.0"),
        (b"MAIL FROM:<sen..der>\r\n", 501, "5.1.7"),
        (b"MAIL FROM:<sender@>\r\n", 501, "5.1.7"),
        (b"MAIL FROM:<s\x01ender@example.org>\r\n", 501, "5.1.7"),
        (b"MAIL FROM:<sender@example.org> SIZE=99999999999\r\n", 552, "5.3.4"),
        (b"MAIL FROM:<sender@example.org> SIZE=abc\r\n", 501, "5.5.4"),
        (b"MAIL FROM:<sender@example.org> SIZE=\xc2\xb2\r\n", 501, "5.5.4"),  # "2" superscript: isdigit, not int
        (b"MAIL FROM:<sender@example.org> BODY=BINARYMIME\r\n", 555, "5.5.4"),  # Postfix: Unsupported option
        (b"MAIL FROM:<sender@example.org> FROB=1\r\n", 555, "5.5.4"),
        (b"MAIL FROM:<j\xc3\xb6rg@example.org>\r\n", 553, "5.6.7"),  # RFC 6531 3.4, Postfix's reply
        (b"MAIL FROM:<j\xc3\xb6rg@example.org> SMTPUTF8\r\n", 250, "2.1.0"),
        (b"MAIL FROM:<a@b.c>\xff\r\n", 500, "5.5.2"),
    ],
)
def test_mail_from_syntax(line, code, enhanced):
    d = Driver().feed(EHLO + line)
    reply = d.replies()[-1]
    assert reply.startswith(f"{code} {enhanced} "), reply


def test_esmtp_parameters_need_ehlo():
    d = Driver().feed(b"HELO client\r\nMAIL FROM:<a@example.org> SIZE=10\r\n")
    assert d.replies()[-1].startswith("555 5.5.4")


@pytest.mark.parametrize(
    "line, code",
    [
        (b"RCPT TO:<postmaster>\r\n", 250),
        (b"RCPT TO:<Postmaster>\r\n", 250),
        (b"RCPT TO:<>\r\n", 501),
        (b"RCPT TO:<user>\r\n", 250),  # the machine takes it; smtpd qualifies it (user@$myorigin)
        (b"RCPT TO:<user@>\r\n", 501),
        (b"RCPT FROM:<a@example.com>\r\n", 501),
        (b"RCPT TO:<a@example.com> NOTIFY=NEVER\r\n", 250),  # RFC 3461
        (b"RCPT TO:<a@example.com> FROB=1\r\n", 555),
        (b"RCPT TO:<\"quoted name\"@example.com>\r\n", 250),
        (b"RCPT TO:<a@[192.0.2.1]>\r\n", 250),
        (b"RCPT TO:<a@[IPv6:2001:db8::1]>\r\n", 250),
        (b"RCPT TO:<a@[300.0.2.1]>\r\n", 501),
        (b"RCPT TO:<" + b"x" * 65 + b"@example.com>\r\n", 501),
        (b"RCPT TO:<j\xc3\xb6rg@example.com>\r\n", 553),
    ],
)
def test_rcpt_to_syntax(line, code):
    d = Driver().feed(EHLO + MAIL + line)
    assert d.codes()[-1] == code, d.replies()


def test_utf8_recipient_allowed_after_smtputf8_mail():
    d = Driver().feed(EHLO + b"MAIL FROM:<a@example.org> SMTPUTF8\r\nRCPT TO:<j\xc3\xb6rg@example.com>\r\n")
    assert d.codes()[-1] == 250
    assert d.of_type(RcptTo)[0].recipient == "jörg@example.com"


def test_recipient_limit_answers_452_4_5_3():
    d = Driver(Settings(recipient_limit=3)).feed(EHLO + MAIL + RCPT * 4 + b"DATA\r\n.\r\n")
    assert d.replies()[-3].startswith("452 4.5.3")
    assert d.codes()[-2:] == [354, 250]
    assert len(d.of_type(RcptTo)) == 3


def test_rejected_recipients_leave_no_valid_recipients_554():
    def decide(event):
        return Reply(550, "5.1.1", "User unknown") if isinstance(event, RcptTo) else None

    d = Driver(decide=decide).feed(EHLO + MAIL + RCPT + b"DATA\r\n")
    assert d.replies()[-1] == "554 5.5.1 Error: no valid recipients"


def test_long_command_line_is_refused_and_session_stays_in_sync():
    d = Driver(Settings(line_length_limit=100))
    d.feed(EHLO + b"NOOP " + b"x" * 50)
    d.feed(b"y" * 200)  # no line end yet: the line is already too long
    d.feed(b"z" * 10 + b"\r\nNOOP\r\n")
    assert d.replies()[-2:] == ["500 5.5.2 Error: line too long", "250 2.0.0 Ok"]


def test_complete_overlong_line_is_refused():
    d = Driver(Settings(line_length_limit=100)).feed(EHLO + b"NOOP " + b"x" * 150 + b"\r\nNOOP\r\n")
    assert d.codes()[-2:] == [500, 250]


def test_hard_error_limit_closes_with_421():
    d = Driver(Settings(hard_error_limit=3)).feed(b"FROB\r\n" * 5)
    assert d.codes() == [220, 500, 500, 500, 421]
    assert d.replies()[-1].startswith("421 4.7.0")
    assert d.conn.closed


@pytest.mark.parametrize("verb", [b"GET / HTTP/1.0", b"POST /x HTTP/1.1", b"CONNECT a:25 HTTP/1.1"])
def test_forbidden_http_commands_end_the_session(verb):
    d = Driver().feed(verb + b"\r\nEHLO x\r\n")
    assert d.codes() == [220, 221]
    assert d.conn.closed


def test_vrfy_can_be_disabled():
    d = Driver(Settings(vrfy=False)).feed(b"VRFY root\r\n")
    assert d.replies()[-1].startswith("502 5.5.1")


def test_data_with_argument_is_a_syntax_error():
    d = Driver().feed(EHLO + MAIL + RCPT + b"DATA now\r\n")
    assert d.replies()[-1].startswith("501 5.5.4")


# -- DATA -----------------------------------------------------------------------


def data_session(body: bytes, settings: Settings = Settings()) -> Driver:
    return Driver(settings).feed(EHLO + MAIL + RCPT + b"DATA\r\n" + body)


def test_dot_stuffing_is_removed():
    d = data_session(b"..leading dot\r\n.\r\n..\r\n...\r\n.\r\n")
    assert d.content() == b".leading dot\r\n"  # ends at the first lone dot
    # "..\r\n" afterwards is a command again: not a letter first, Postfix's
    # smtpd_forbidden_commands regexp:{{/^[^A-Z]/ Bogus}} ends the session
    assert d.codes()[-1] == 221


@pytest.mark.parametrize(
    "smuggle",
    [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r", b"\r.\r\n", b"\n.\r"],
    ids=["lf.lf", "crlf.lf", "lf.crlf", "cr.cr", "cr.crlf", "lf.cr"],
)
def test_smtp_smuggling_sequences_do_not_end_data(smuggle):
    body = b"Subject: a\r\n\r\nfirst" + smuggle + b"MAIL FROM:<evil@example.net>\r\nRCPT TO:<v@example.com>\r\n"
    d = data_session(body + b"\r\n.\r\n")
    assert len(d.of_type(DataEnd)) == 1
    assert len(d.of_type(MailFrom)) == 1  # the smuggled MAIL is content, not a command
    assert b"MAIL FROM:<evil@example.net>" in d.content()


def test_bare_lf_is_normalized_to_crlf():
    d = data_session(b"one\ntwo\r\nthree\n.\r\n.\r\n")
    assert d.content() == b"one\r\ntwo\r\nthree\r\n\r\n"


def test_bare_cr_becomes_a_space():
    d = data_session(b"a\rb\r\n.\r\n")
    assert d.content() == b"a b\r\n"  # cleanup_replace_stray_cr_lf (Postfix)


def test_bare_lf_rejected_after_the_real_end_when_forbidden():
    d = data_session(b"one\ntwo\r\n.\r\nNOOP\r\n", Settings(bare_newline="reject"))
    assert d.replies()[-2] == "550 5.5.2 localhost Error: bare <LF> received"
    assert d.codes()[-1] == 250  # in step: the NOOP after the real end is answered
    assert d.of_type(DataAborted) and not d.of_type(DataEnd)
    assert not d.conn.closed


def test_bare_lf_rejected_with_521_ends_the_session():
    d = data_session(b"one\ntwo\r\n.\r\n", Settings(bare_newline="reject", bare_newline_code=521))
    assert d.replies()[-1] == "521 5.5.2 localhost Error: bare <LF> received"
    assert d.conn.closed


def test_bare_lf_command_rejected_when_forbidden():
    d = Driver(Settings(bare_newline="reject")).feed(b"EHLO x\n")
    assert d.codes() == [220, 550]
    assert d.conn.closed


def test_message_too_big_is_refused_after_the_real_end():
    d = data_session(b"x" * 100 + b"\r\n" + b"y" * 100 + b"\r\n.\r\nNOOP\r\n", Settings(message_size_limit=150))
    assert d.replies()[-2] == "552 5.3.4 Error: message file too big"
    assert d.codes()[-1] == 250  # in sync: NOOP answered
    assert d.of_type(DataAborted) and not d.of_type(DataEnd)


def test_empty_message():
    d = data_session(b".\r\n")
    assert d.of_type(DataEnd)[0].size == 0


def test_very_long_data_line_is_streamed():
    line = b"." + b"a" * 100_000 + b"\r\n"
    d = Driver()
    d.feed(EHLO + MAIL + RCPT + b"DATA\r\n")
    for start in range(0, len(line), 1000):
        d.feed(line[start:start + 1000])
    d.feed(b".\r\n")
    assert d.content() == line[1:]
    assert len(d.conn._in) == 0


def test_eof_inside_data_aborts_the_message():
    d = data_session(b"partial content\r\n")
    d.eof()
    assert d.of_type(DataAborted) and not d.of_type(DataEnd)
    assert isinstance(d.events[-1], Closed)


def test_failed_data_end_clears_the_transaction():
    def decide(event):
        return replies.LOCAL_ERROR if isinstance(event, DataEnd) else None

    d = Driver(decide=decide).feed(EHLO + MAIL + RCPT + b"DATA\r\nx\r\n.\r\n" + RCPT)
    assert d.codes()[-2:] == [451, 503]


def test_421_reply_closes_the_session():
    d = Driver(decide=lambda e: Reply(421, "4.7.0", "go away") if isinstance(e, MailFrom) else None)
    d.feed(EHLO + MAIL + RCPT)
    assert d.codes()[-1] == 421 and d.conn.closed


# -- misuse is a bug in the caller and raises ---------------------------------------


def test_next_event_before_respond_raises():
    conn = ServerConnection()
    conn.greet()
    conn.receive_data(EHLO)
    assert isinstance(conn.next_event(), Hello)
    with pytest.raises(LocalProtocolError):
        conn.next_event()


def test_respond_without_event_raises():
    conn = ServerConnection()
    with pytest.raises(LocalProtocolError):
        conn.respond()


def test_data_end_needs_an_explicit_reply():
    conn = ServerConnection()
    conn.greet()
    conn.receive_data(EHLO + MAIL + RCPT + b"DATA\r\n.\r\n")
    while not isinstance(event := conn.next_event(), DataEnd):
        assert event is not NEED_DATA
        if event.needs_reply:
            conn.respond()
    with pytest.raises(LocalProtocolError):
        conn.respond()


def test_close_queues_reply_and_aborts_data():
    d = data_session(b"half a message\r\n")
    d.conn.close(replies.shutting_down("mx"), "shutting down")
    d.pump()
    assert d.replies()[-1].startswith("421 4.3.2")
    assert d.of_type(DataAborted)


@pytest.mark.parametrize("line, code", [
    ("MA\u0131L FROM:<a@example.org>", 500),  # dotless i: "I" to str.upper(); not recognized
    ("\u017fTARTTLS", 221),  # long s: "S" to str.upper(); not A-Z first: a non-SMTP command, as in Postfix
    ("MAIL FROM:<a@example.org> BODY=8B\u0131TMIME", 555),
    ("MAIL FROM:<a@example.org> \u0131D=1", 501),  # not an esmtp-keyword at all
    ("MAIL \u0192ROM:<a@example.org>", 501),
    ("mail from:<a@example.org> body=8bitmime", 250),  # ASCII in any case
])
def test_keywords_are_compared_in_ascii_only(line, code):
    """Red team 31: verbs and keywords went through str.upper(), so MAıL was MAIL and
    ſTARTTLS was STARTTLS here, and a filter in front that compares as Postfix does (in
    ASCII) saw another command than trimail did.  (500 and the 221 of a non-SMTP command
    are what Postfix answers them.)"""
    d = Driver(Settings(hostname="mx.example.com"))
    d.feed(EHLO)
    d.output.clear()
    d.feed(line.encode() + b"\r\n")
    assert bytes(d.output)[:3] == str(code).encode(), bytes(d.output)
