"""Observability: every SMTP session as an attempt (commands, replies, how it
ended, refused sessions too), hit counts on faults, and in relay mode every
delivery outcome; real TestMTAs, real smtplib clients and raw sockets."""

from __future__ import annotations

import smtplib
import socket

import pytest
import trio

from trimail.testing import MTAAssertionError, TestMTA, open_test_mta
from trimail.testing.observe import Attempt

HOST = "127.0.41.4"
DOWNSTREAM = "127.0.41.5"
BODY = "Subject: Welcome\r\n\r\nHello\r\n"


def send(mta, sender="app@app.example", rcpts=("ann@example.com",), login=None, host=HOST):
    with smtplib.SMTP(host, mta.port, local_hostname="app.example", timeout=30, source_address=(host, 0)) as client:
        if login:
            client.login(*login)
        return client.sendmail(sender, list(rcpts), BODY)


def test_an_attempt_records_each_command_with_its_reply_and_how_it_ended():
    with TestMTA(smtpd_listen=f"{HOST}:0") as mta:
        send(mta)
        [attempt] = mta.wait_for_attempts(1)
        [message] = mta.wait_for()
        assert attempt.client_address == HOST and attempt.helo == "app.example"
        assert [c.split(" ")[0].upper() for c in attempt.commands] == ["EHLO", "MAIL", "RCPT", "DATA", ".", "QUIT"]
        assert attempt.replies == [220, 250, 250, 250, 354, 250, 221]
        assert attempt.reply_to(".").text == f"2.0.0 Ok: queued as {message.queue_id}"
        assert attempt.reply_to("EHLO").text.splitlines()[0] == "trimail.test"  # the multi-line reply, whole
        assert attempt.greeting.code == 220 and attempt.ended == "quit" and not attempt.tls
        assert attempt.message_bytes == len(BODY)


def test_the_app_retried_three_times_counted_by_attempts_and_fault_hits():
    with TestMTA(smtpd_listen=f"{HOST}:0") as mta:
        fault = mta.defer(sender="app@*", count=3)
        for _ in range(3):
            with pytest.raises(smtplib.SMTPSenderRefused):
                send(mta)
        send(mta)
        attempts = mta.wait_for_attempts(4)
        assert fault.hits == 3 and mta.faults == [fault]
        assert [a.reply_to("MAIL").code for a in attempts] == [451, 451, 451, 250]
        assert [a.ended for a in attempts] == ["quit"] * 4


def test_sessions_refused_at_connect_are_attempts_too():
    with TestMTA(smtpd_listen=f"{HOST}:0", smtpd_client_restrictions="reject", smtpd_delay_reject="no") as mta:
        with pytest.raises(smtplib.SMTPConnectError):
            smtplib.SMTP(HOST, mta.port, timeout=30)
        [attempt] = mta.wait_for_attempts(1)
        assert attempt.greeting.code == 554 and attempt.commands == []
        assert attempt.ended == "rejected at connect: 554 5.7.1 <unknown[127.0.0.1]>: Client host rejected: " \
                                "Access denied"


def test_pipelined_commands_auth_secrets_and_a_client_that_hangs_up():
    with TestMTA(smtpd_listen=f"{HOST}:0", auth={"app": "s3cret"}) as mta:
        send(mta, login=("app", "s3cret"))
        with socket.create_connection((HOST, mta.port), timeout=30, source_address=(HOST, 0)) as raw:
            raw.recv(1000)
            raw.sendall(b"EHLO client.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@example.com>\r\n"
                        b"DATA\r\n")
            received = b""
            while not received.endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n"):
                received += raw.recv(1000)
            raw.sendall(b"Subject: x\r\n\r\n..dot\r\n.\r\nNOOP\r\n")
            while b"250 2.0.0 Ok\r\n" not in received:
                received += raw.recv(1000)
        logged_in, hung_up = mta.wait_for_attempts(2)
        assert "AUTH PLAIN ***" in logged_in.commands and "s3cret" not in str(logged_in.commands)
        assert "AUTH 235" in str(logged_in)
        assert hung_up.commands == ["EHLO client.example", "MAIL FROM:<a@b.example>", "RCPT TO:<c@example.com>",
                                    "DATA", ".", "NOOP"]
        assert hung_up.replies == [220, 250, 250, 250, 354, 250, 250] and hung_up.helo == "client.example"
        assert hung_up.ended == "client disconnected" and hung_up.message_bytes == len(b"Subject: x\r\n\r\n..dot\r\n")


def test_wait_for_attempts_fails_listing_the_sessions():
    with TestMTA(smtpd_listen=f"{HOST}:0") as mta:
        send(mta)
        with pytest.raises(MTAAssertionError) as failure:
            mta.wait_for_attempts(2, timeout=0.2)
        assert "expected 2 finished SMTP session(s) within 0.2s, 1 finished:" in str(failure.value)
        assert f"[{HOST}] helo=<app.example>: greeting 220, EHLO 250," in str(failure.value) and "QUIT 221; quit" in str(failure.value)
        mta.clear()
        assert mta.attempts == []


def test_attempt_reads_a_terminator_split_across_reads():
    attempt = Attempt("192.0.2.1")
    attempt.sent(b"220 hi\r\n")
    attempt.received(b"DATA\r\n")
    attempt.sent(b"354 go\r\n")
    for piece in (b"a\r\n.x\r", b"\n", b"b\r", b"\n.", b"\r\nQUIT\r\n"):
        attempt.received(piece)
    attempt.sent(b"250 ok\r\n221 bye\r\n")
    assert attempt.commands == ["DATA", ".", "QUIT"] and attempt.replies == [220, 354, 250, 221]
    assert attempt.message_bytes == len(b"a\r\n.x\r\nb\r\n")


def test_relay_mode_records_each_delivery_outcome():
    with TestMTA(smtpd_listen=f"{DOWNSTREAM}:0") as downstream:
        downstream.reject(rcpt="bad@*", code=550, text="No such user")
        downstream.defer_next(1)
        with TestMTA(smtpd_listen=f"{HOST}:0", transport={"example.com": f"smtp:[{DOWNSTREAM}]:{downstream.port}"},
                     minimal_backoff_time="1s", maximal_backoff_time="1s") as gateway:
            send(gateway, sender="app@example.com", rcpts=("ann@example.com", "bad@example.com"))
            [bounced] = gateway.wait_for_delivery(status="bounced", timeout=15)
            assert bounced.recipient == "bad@example.com" and bounced.dsn == "5.1.1"
            assert "550 5.1.1 No such user" in bounced.reply and bounced.relay.startswith(f"{DOWNSTREAM}[")
            [sent] = gateway.wait_for_delivery(status="sent", recipient="ann@example.com", timeout=15)
            assert sent.dsn.startswith("2.") and sent.queue_id == bounced.queue_id
            first = gateway.deliveries[0]
            assert (first.recipient, first.status, first.dsn) == ("ann@example.com", "deferred", "4.3.0")  # defer_next
            with pytest.raises(MTAAssertionError, match="status=bounced"):
                gateway.wait_for_delivery(status="bounced", recipient="ann@example.com", timeout=0.1)
            # the bounce went back to the sender, who is downstream too
            assert downstream.wait_for_one(sender="", timeout=15).recipients == ["app@example.com"]


async def test_trio_form_attempts_and_deliveries():
    async with open_test_mta(smtpd_listen=f"{DOWNSTREAM}:0") as downstream, \
            open_test_mta(smtpd_listen=f"{HOST}:0",
                          transport={"example.com": f"smtp:[{DOWNSTREAM}]:{downstream.port}"}) as gateway:
        await trio.to_thread.run_sync(send, gateway)
        [attempt] = await gateway.wait_for_attempts(1)
        assert attempt.ended == "quit"
        [sent] = await gateway.wait_for_delivery(status="sent", timeout=15)
        assert sent.recipient == "ann@example.com"
        [relayed] = await downstream.wait_for_attempts(1)
        assert relayed.helo == "trimail.test"


def test_a_failed_wait_names_the_sessions_that_were_refused():
    with TestMTA(smtpd_listen=f"{HOST}:0") as mta:
        mta.defer(sender="app@*", count=1)
        with pytest.raises(smtplib.SMTPSenderRefused):
            send(mta)
        mta.wait_for_attempts(1)
        with pytest.raises(MTAAssertionError) as failure:
            mta.wait_for(timeout=0)
        assert str(failure.value).splitlines()[-2:] == [
            "1 SMTP session(s) with a refusal or not ended by QUIT:",
            f"  [{HOST}] helo=<app.example>: greeting 220, EHLO 250, MAIL 451, RSET 250, QUIT 221; quit"]
