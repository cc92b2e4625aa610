"""Bounces return the original message as Postfix does (bounce_original in
src/bounce/bounce_notify_util.c): whole as message/rfc822 up to bounce_size_limit,
headers only (text/rfc822-headers) beyond it, for RET=HDRS and in delay warnings."""

from __future__ import annotations

import email
import email.policy
import smtplib

import pytest
import trio

from tests.conftest import wait_for
from tests.peers import Sink
from trimail.delivery.bounce import Failure, build_dsn, dsn_parts, header_lines, returns_full
from trimail.queue.store import Store

HOST = "127.0.44.1"  # this module's loopback addresses
SINK = "127.0.44.2"
ORIGINAL = (b"From: alice@client.example\r\nTo: rcpt@gone.example\r\nSubject: doomed\r\n"
            b"Content-Type: text/plain\r\n\r\nfirst body line\r\nlast body line\r\n")


def parse(content: bytes) -> list:
    message = email.message_from_bytes(content, policy=email.policy.default)
    assert message.get_content_type() == "multipart/report"
    return list(message.iter_parts())


def dsn(original: bytes, full: bool, **kw) -> bytes:
    return build_dsn(hostname="mx.test.example", queue_id="Q1", sender="alice@client.example",
                     arrival_time=0.0, failures=[Failure("rcpt@gone.example", "5.1.2", "dns; gone")],
                     original=original, full=full, **kw)


def test_full_return_is_the_whole_message_as_message_rfc822():
    returned = parse(dsn(ORIGINAL, full=True))[2]
    assert returned.get_content_type() == "message/rfc822"
    assert returned["Content-Description"] == "Undelivered Message"
    [inner] = returned.get_payload()
    assert inner["Return-Path"] == "<alice@client.example>" and inner["Subject"] == "doomed"
    assert inner.get_content().splitlines() == ["first body line", "last body line"]


def test_headers_only_return_stops_at_the_first_non_header_line():
    content = dsn(ORIGINAL, full=False)
    returned = parse(content)[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert returned["Content-Description"] == "Undelivered Message Headers"
    assert b"Subject: doomed\r\n" in content and b"first body line" not in content
    assert header_lines(b"Subject: a\r\n folded\r\nnot a header\r\nX-After: no\r\n") == b"Subject: a\r\n folded\r\n"


def test_smtputf8_mail_is_returned_as_message_global():
    assert parse(dsn(ORIGINAL, full=True, smtputf8=True))[2].get_content_type() == "message/global"
    assert parse(dsn(ORIGINAL, full=False, smtputf8=True))[2].get_content_type() == "message/global-headers"


@pytest.mark.parametrize("size, ret, delayed, limit, full", [
    (50000, None, False, 50000, True),  # up to the limit: whole
    (50001, None, False, 50000, False),  # beyond it: headers only, never truncated
    (0, None, False, 50000, False),  # unknown size: headers only (Postfix)
    (10, "HDRS", False, 50000, False),  # RET=HDRS whatever the size
    (10, "hdrs", False, 50000, False),
    (10, "FULL", False, 50000, True),
    (10, "FULL", True, 50000, False),  # delay warnings return headers only (bounce_warn_service)
    (10 ** 9, None, False, 0, True),  # bounce_size_limit = 0: no limit
])
def test_what_is_returned(size, ret, delayed, limit, full):
    assert returns_full(size=size, ret=ret, delayed=delayed, limit=limit) is full


def submit(server, body: bytes) -> None:
    address = server.addresses[0]
    with smtplib.SMTP(address.host, address.port, timeout=30) as client:
        client.sendmail("alice@client.example", ["rcpt@gone.example"], body)


async def bounce_of(start_mta, body: bytes, **params) -> bytes:
    with Sink(SINK) as senders:
        srv = await start_mta(smtpd_listen=f"{HOST}:0", **params,
                              transport_maps=f"inline:{{ client.example=smtp:[{SINK}]:{senders.port} }}")
        await trio.to_thread.run_sync(submit, srv, body)
        await wait_for(lambda: len(senders.messages) == 1, 20)
        [(sender, rcpts, content)] = senders.messages
        assert sender == "<>" and rcpts == ["alice@client.example"]

        def empty() -> bool:
            store = Store.open(srv.config.queue_directory, readonly=True)
            try:
                return not store.list_messages()
            finally:
                store.close()
        await wait_for(empty, 20)
        return content


async def test_bounce_returns_the_whole_message(start_mta):
    returned = parse(await bounce_of(start_mta, ORIGINAL))[2]
    assert returned.get_content_type() == "message/rfc822"
    [inner] = returned.get_payload()
    assert inner["Subject"] == "doomed" and inner["Return-Path"] == "<alice@client.example>"
    assert inner["Received"] is not None  # the message as queued, trace headers and all
    assert inner.get_content().splitlines() == ["first body line", "last body line"]


async def test_bounce_of_a_message_over_bounce_size_limit_returns_its_headers_only(start_mta):
    body = ORIGINAL + b"x" * 70 + b"\r\n" * 1 + (b"y" * 70 + b"\r\n") * 40
    content = await bounce_of(start_mta, body, bounce_size_limit="2000")
    returned = parse(content)[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert b"Subject: doomed\r\n" in content
    assert b"first body line" not in content and b"yyyy" not in content


@pytest.mark.parametrize("smtputf8", [False, True], ids=["ascii", "smtputf8"])
def test_a_long_or_8bit_reply_is_folded_and_the_report_stays_ascii(smtputf8):
    """Red team 33a: a peer's reply of 1,000 characters (U+20AC here) was written on one
    line twice, 2,946 octets (RFC 5322: at most 998), and as UTF-8 inside a
    message/delivery-status, which is US-ASCII (RFC 3464).  Lines are now folded at 78
    columns as Postfix's are, and the plain report has '?' for what ASCII cannot say."""
    url = "https://help.far.test/" + "a" * 150  # (a usual word is never cut: 33c)
    reply = "smtp; 550 5.7.1 " + "\u20ac" * 1300 + " " + "x" * 1200 + f" see {url} (in reply to RCPT TO command)"
    head, tail = dsn_parts(hostname="mx.test.example", queue_id="Q1", sender="a@client.example",
                           arrival_time=0.0, failures=[Failure("r@far.example", "5.7.1", reply, "mx.far.example")],
                           full=False, smtputf8=smtputf8)
    text = head + tail
    assert max(len(line) for line in text.split(b"\r\n")) <= 998
    message = email.message_from_bytes(text, policy=email.policy.default)
    [report] = [p for p in message.walk() if p.get_content_type().endswith("delivery-status")]
    raw = head.split(b"Content-Description: Delivery report", 1)[1]
    assert raw.isascii() != smtputf8
    code = " ".join(raw.decode("utf-8").split("Diagnostic-Code:", 1)[1].split("\r\n--", 1)[0].split())
    assert code.startswith("smtp; 550 5.7.1 " + ("\u20ac" if smtputf8 else "?") * 5)
    assert code.replace(" ", "").count("x") == 1200 and code.endswith("(in reply to RCPT TO command)")
    assert f" {url} " in code and f" {url} " in " ".join(head.decode("utf-8").split())
    assert report is not None
