"""A filter that is down, too slow, or talks garbage: milter_default_action answers
for it (tempfail by default), Postfix's warning is logged, the SMTP session goes on
and the daemon keeps serving.  The misbehaving filters are FakeMilter scripts."""

from __future__ import annotations

import logging
import smtplib
import struct

import pytest
import trio

from tests.milter.conftest import send, stored
from tests.milter.peers import FakeMilter, reply
from tests.ports import free_port
from trimail.milter import protocol as p


def on(command: bytes, *frames: bytes):
    return lambda c, data, m: list(frames) if c == command else None


async def fake(nursery, script=None, **kw) -> FakeMilter:
    return await nursery.start(FakeMilter(script, **kw).run)


DOWN = f"inet:127.0.45.4:{free_port('127.0.45.4')}"


async def test_a_filter_that_is_down_tempfails_by_default(start_serve, caplog):
    srv = await start_serve(smtpd_milters=DOWN)
    result = await send(srv, "alice@example.com", ["bob@remote.example"])
    assert result.mail == (451, b"4.7.1 Service unavailable - try again later")
    assert f"connect to Milter service {DOWN}: Connection refused" in caplog.text


async def test_default_action_accept_goes_on_without_the_filter(start_serve, caplog):
    srv = await start_serve(smtpd_milters=DOWN, milter_default_action="accept")
    result = await send(srv, "alice@example.com", ["bob@remote.example"])
    assert stored(srv, result.queue_id)[0].state == "incoming"
    assert f"connect to Milter service {DOWN}: Connection refused" in caplog.text


async def test_default_action_reject_refuses_the_connection(start_serve, caplog):
    # Postfix: the failure at connect answers 550 5.5.0 for the filter, a 5xx at
    # CONNECT is the 554 greeting
    caplog.set_level(logging.INFO)
    srv = await start_serve(smtpd_milters=DOWN, milter_default_action="reject")

    def greet() -> tuple[int, bytes]:
        client = smtplib.SMTP()
        try:
            return client.connect("127.0.45.1", srv.addresses[0].port)
        finally:
            client.close()

    assert await trio.to_thread.run_sync(greet) == (554, b"mx.test.example ESMTP not accepting connections")
    assert "milter-reject: CONNECT from unknown[127.0.0.1]: 550 5.5.0 Service unavailable;" in caplog.text


async def test_default_action_quarantine_holds(start_serve, caplog):
    caplog.set_level(logging.INFO)
    srv = await start_serve(smtpd_milters=DOWN, milter_default_action="quarantine")
    result = await send(srv, "alice@example.com", ["bob@remote.example"])
    assert stored(srv, result.queue_id)[0].state == "hold"
    assert "milter-hold: MAIL from unknown[127.0.0.1]: default_action;" in caplog.text


async def test_a_slow_filter_times_out_after_milter_command_timeout(start_serve, nursery, caplog):
    milter = await fake(nursery, on(p.SMFIC_MAIL, b"SLEEP"))
    srv = await start_serve(smtpd_milters=milter.name, milter_command_timeout="1s")
    start = trio.current_time()
    result = await send(srv, "alice@example.com", ["bob@remote.example"])
    assert result.mail == (451, b"4.7.1 Service unavailable - try again later")
    assert 0.9 < trio.current_time() - start < 10
    assert f"milter {milter.name}: can't read SMFIC_MAIL reply packet header: Connection timed out" in caplog.text


async def test_a_slow_filter_times_out_after_milter_content_timeout(start_serve, nursery, caplog):
    milter = await fake(nursery, on(p.SMFIC_BODYEOB, b"SLEEP"))
    srv = await start_serve(smtpd_milters=milter.name, milter_content_timeout="1s")
    result = await send(srv, "alice@example.com", ["bob@remote.example"])
    assert result.data == (451, b"4.7.1 Service unavailable - try again later")
    assert "can't read SMFIC_BODYEOB reply packet header: Connection timed out" in caplog.text


async def test_a_filter_that_closes_the_connection(start_serve, nursery, caplog):
    milter = await fake(nursery, on(p.SMFIC_RCPT, b"CLOSE"))
    srv = await start_serve(smtpd_milters=milter.name)
    result = await send(srv, "alice@example.com", ["bob@remote.example"])
    assert result.rcpts == [(451, b"4.7.1 Service unavailable - try again later")]
    assert f"milter {milter.name}: can't read SMFIC_RCPT reply packet header" in caplog.text


GARBAGE = {
    "huge": struct.pack(">I", 0xFFFFFFF0) + b"x" * 10,
    "unknown": reply(b"Z"),
    "trailing": reply(p.SMFIR_CONTINUE, b"junk"),
    "unterminated": reply(p.SMFIR_ADDRCPT, b"no-nul"),
    "modification-before-eom": reply(p.SMFIR_ADDHEADER, b"X-A\0b\0"),
}


@pytest.mark.parametrize("frame", GARBAGE.values(), ids=GARBAGE.keys())
async def test_garbage_frames_are_protocol_errors(start_serve, nursery, caplog, frame):
    milter = await fake(nursery, on(p.SMFIC_MAIL, frame))
    srv = await start_serve(smtpd_milters=milter.name)
    result = await send(srv, "alice@example.com", ["bob@remote.example"])
    assert result.mail == (451, b"4.7.1 Service unavailable - try again later")
    assert f"milter {milter.name}: " in caplog.text


async def test_a_failed_filter_stays_failed_for_the_session_and_the_daemon_serves_on(start_serve, nursery):
    milter = await fake(nursery, on(p.SMFIC_MAIL, reply(b"Z")))
    srv = await start_serve(smtpd_milters=milter.name, milter_default_action="accept")
    first = await send(srv, "alice@example.com", ["bob@remote.example"])
    second = await send(srv, "alice@example.com", ["bob@remote.example"])
    assert stored(srv, first.queue_id)[0].state == "incoming"
    assert stored(srv, second.queue_id)[0].state == "incoming"
    assert milter.connections == 2  # one connection per SMTP session, as Postfix


async def test_a_filter_with_a_newer_protocol_version_is_refused(start_serve, nursery, caplog):
    milter = await fake(nursery, optneg=reply(p.SMFIC_OPTNEG, struct.pack(">III", 7, 0, 0)))
    srv = await start_serve(smtpd_milters=milter.name)
    result = await send(srv, "alice@example.com", ["bob@remote.example"])
    assert result.mail[0] == 451
    assert "protocol version 7 conflict with MTA protocol version 6" in caplog.text


async def test_a_filter_asking_for_actions_not_offered_is_refused(start_serve, nursery, caplog):
    milter = await fake(nursery, optneg=reply(p.SMFIC_OPTNEG, struct.pack(">III", 6, 1 << 20, 0)))
    srv = await start_serve(smtpd_milters=milter.name)
    result = await send(srv, "alice@example.com", ["bob@remote.example"])
    assert result.mail[0] == 451
    assert "request mask 0x100000 conflict" in caplog.text
