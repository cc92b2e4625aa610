"""Red team (session 34) of the milter client against a real serve: a quarantine a
filter sends while it reads the headers or the body must hold the message as one at
end of message does (Postfix takes SMFIR_QUARANTINE at any event), a filter that
streams them is bounded like any other modification, and a filter's reply text or
quarantine reason with a bare CR or LF can neither split the SMTP reply line nor
start a mail log line of its own."""

from __future__ import annotations

import logging
import socket

import pytest
import trio

from tests.milter.conftest import send, stored
from tests.milter.peers import FakeMilter, reply
from trimail.milter import protocol as p
from trimail.milter.client import MAX_EDITS


def on(command: bytes, *frames: bytes):
    return lambda c, data, m: list(frames) if c == command else None


async def fake(nursery, script=None, **kw) -> FakeMilter:
    return await nursery.start(FakeMilter(script, **kw).run)


@pytest.mark.parametrize("event", [p.SMFIC_HEADER, p.SMFIC_EOH, p.SMFIC_BODY])
async def test_a_quarantine_while_the_content_is_read_holds_the_message(start_serve, nursery, caplog, event):
    # was: dropped (the event had no list for modifications); the message was queued
    # as "incoming" and delivered
    caplog.set_level(logging.INFO)
    milter = await fake(nursery, on(event, reply(p.SMFIR_QUARANTINE, b"looks bad\0"), reply(p.SMFIR_CONTINUE)))
    srv = await start_serve(smtpd_milters=milter.name)
    result = await send(srv, "alice@example.com", ["bob@remote.example"])
    assert stored(srv, result.queue_id)[0].state == "hold"
    assert "milter-hold: END-OF-MESSAGE from unknown[127.0.0.1]: looks bad;" in caplog.text


async def test_a_filter_streaming_quarantines_at_a_header_is_bounded(start_serve, nursery, caplog):
    # was: each frame restarted milter_content_timeout and nothing counted them: the
    # session read them for as long as the filter sent
    flood = [reply(p.SMFIR_QUARANTINE, b"q\0")] * (MAX_EDITS + 1) + [reply(p.SMFIR_CONTINUE)]
    milter = await fake(nursery, on(p.SMFIC_HEADER, *flood))
    srv = await start_serve(smtpd_milters=milter.name)
    result = await send(srv, "alice@example.com", ["bob@remote.example"])
    assert result.data == (451, b"4.7.1 Service unavailable - try again later")
    assert f"milter {milter.name}: too many modifications at SMFIC_HEADER" in caplog.text


def raw_transaction(port: int) -> bytes:
    """A session whose replies are read as bytes, without smtplib's line splitting."""
    with socket.create_connection(("127.0.45.1", port), timeout=30) as sock:
        sock.settimeout(30)
        out = b""
        for line in (b"", b"EHLO c\r\n", b"MAIL FROM:<a@example.com>\r\n", b"RCPT TO:<b@remote.example>\r\n",
                     b"DATA\r\n", b"Subject: x\r\n\r\nbody\r\n.\r\n", b"QUIT\r\n"):
            sock.sendall(line)
            got = b""
            while not got.endswith(b"\r\n") or got.split(b"\r\n")[-2][3:4] != b" ":
                chunk = sock.recv(4096)
                if not chunk:
                    return out + got
                got += chunk
            out += got
        return out


@pytest.mark.parametrize("text", [b"550 5.7.1 spam\n250 2.0.0 Ok: queued as FORGED",
                                  b"550 5.7.1 spam\r250 2.0.0 Ok: queued as FORGED"])
async def test_a_reply_with_a_bare_line_end_stays_one_line(start_serve, nursery, caplog, text):
    # was: sent as it came: "550 5.7.1 spam\n250 2.0.0 Ok: ..." on the wire (a client
    # reading by LF took the 250 as the reply to its next command) and in the log
    caplog.set_level(logging.INFO)
    milter = await fake(nursery, on(p.SMFIC_BODYEOB, reply(p.SMFIR_REPLYCODE, text + b"\0")))
    srv = await start_serve(smtpd_milters=milter.name)
    wire = await trio.to_thread.run_sync(raw_transaction, srv.addresses[0].port)
    assert b"550 5.7.1 spam?250 2.0.0 Ok: queued as FORGED\r\n221 " in wire, wire
    assert wire.count(b"\n") == wire.count(b"\r\n") and wire.count(b"\r") == wire.count(b"\r\n")
    rejected = [r.getMessage() for r in caplog.records if "milter-reject" in r.getMessage()]
    assert rejected and all("\n" not in m and "\r" not in m for m in rejected), rejected


async def test_a_quarantine_reason_with_a_line_end_is_one_log_line(start_serve, nursery, caplog):
    caplog.set_level(logging.INFO)
    reason = b"bad\nDec  6 14:00:00 mx trimail/smtp[1]: X: to=<b@remote.example>, status=sent\0"
    milter = await fake(nursery, on(p.SMFIC_BODYEOB, reply(p.SMFIR_QUARANTINE, reason), reply(p.SMFIR_ACCEPT)))
    srv = await start_serve(smtpd_milters=milter.name)
    result = await send(srv, "alice@example.com", ["bob@remote.example"])
    assert stored(srv, result.queue_id)[0].state == "hold"
    held = [r.getMessage() for r in caplog.records if "milter-hold" in r.getMessage()]
    assert held and all("\n" not in m for m in held), held
    assert "milter-hold: END-OF-MESSAGE from unknown[127.0.0.1]: bad?Dec  6" in caplog.text


async def test_a_header_value_with_empty_lines_gets_no_blank_continuation_line(start_serve, nursery):
    # was: "X-A: a\r\n\t\r\n\t\r\n\tBcc: x": a reader that trims the white-space-only
    # line takes it for the end of the header section
    value = b"a\n\n \r\n\t\nBcc: x@evil.example"
    milter = await fake(nursery, on(p.SMFIC_BODYEOB, reply(p.SMFIR_ADDHEADER, b"X-A\0" + value + b"\0"),
                                    reply(p.SMFIR_ACCEPT)))
    srv = await start_serve(smtpd_milters=milter.name)
    result = await send(srv, "alice@example.com", ["bob@remote.example"])
    header = stored(srv, result.queue_id)[1].split(b"\r\n\r\n", 1)[0]
    assert b"X-A: a\r\n\tBcc: x@evil.example" in header, header
    assert all(line.strip() for line in header.split(b"\r\n")), header
