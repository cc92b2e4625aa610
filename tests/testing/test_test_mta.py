"""trimail.testing in both forms: capture, matching, waiting, faults, TLS, AUTH, relaying."""

from __future__ import annotations

import smtplib

import pytest
import trio

from trimail.testing import MTAAssertionError, TestMTA, open_test_mta

BODY = "Subject: Welcome\r\nX-Campaign: spring\r\nMessage-ID: <m@app.example>\r\n\r\nHello Ann, your code is 1234.\r\n"


def send(mta, sender="app@app.example", rcpts=("ann@example.com",), body=BODY, **kw):
    with smtplib.SMTP(mta.host, mta.port, timeout=30) as client:
        if kw.get("tls"):
            client.starttls(context=mta.ssl_context())
        if kw.get("login"):
            client.login(*kw["login"])
        return client.sendmail(sender, list(rcpts), body, mail_options=kw.get("mail_options", ()))


def test_capture_keeps_envelope_facts_message_and_raw_bytes():
    with TestMTA() as mta:
        send(mta, mail_options=["SIZE=200"])
        [m] = mta.wait_for()
        assert (m.sender, m.recipients) == ("app@app.example", ["ann@example.com"])
        assert m.params == {"SIZE": "200"}
        assert m.client_address == "127.0.0.1" and m.helo and m.protocol == "ESMTP"
        assert m.tls is None and m.auth is None
        assert m.message["Subject"] == "Welcome" and m.raw.endswith(b"Hello Ann, your code is 1234.\r\n")
        assert m.raw.startswith(b"Received: from ")


def test_matching_and_waiting():
    with TestMTA() as mta:
        send(mta, rcpts=("ann@example.com", "bob@example.com"))
        send(mta, sender="other@app.example", rcpts=("bob@example.com",), body="Subject: Bill\r\n\r\nPay 5\r\n")
        assert len(mta.wait_for(count=2)) == 2
        assert [m.subject for m in mta.wait_for(recipient="bob@example.com", count=2)] == ["Welcome", "Bill"]
        assert mta.wait_for(sender="other@app.example")[0].subject == "Bill"
        assert mta.wait_for(subject="Welc")[0].recipients == ["ann@example.com", "bob@example.com"]
        assert mta.wait_for(header=("X-Campaign", "spring"))[0].subject == "Welcome"
        assert mta.wait_for(body="code is 1234")[0].subject == "Welcome"
        assert mta.wait_for(predicate=lambda m: len(m.recipients) == 1)[0].subject == "Bill"
        with pytest.raises(MTAAssertionError) as failure:
            mta.wait_for(subject="Nope", timeout=0.2)
        assert "2 message(s) arrived" in str(failure.value) and "subject='Bill'" in str(failure.value)


def test_assertions_and_clear():
    with TestMTA() as mta:
        mta.assert_nothing_sent()
        send(mta)
        mta.wait_for()
        assert len(mta.assert_sent_to("ANN@example.com", count=1)) == 1
        with pytest.raises(MTAAssertionError, match="expected some message"):
            mta.assert_sent_to("zed@example.com")
        with pytest.raises(MTAAssertionError, match="expected no messages"):
            mta.assert_nothing_sent()
        mta.reject(rcpt="*")
        mta.clear()
        mta.assert_nothing_sent()
        send(mta)  # the fault went with clear()
        mta.wait_for()


def test_reject_and_defer_by_pattern_and_stage():
    with TestMTA() as mta:
        mta.reject(rcpt="bad@*", code=550, text="No such user")
        mta.defer(sender="slow@*")
        refused = send(mta, rcpts=("bad@example.com", "ann@example.com"))
        assert refused == {"bad@example.com": (550, b"5.1.1 No such user")}
        with pytest.raises(smtplib.SMTPSenderRefused) as sender_refused:
            send(mta, sender="slow@app.example")
        assert sender_refused.value.smtp_code == 451
        mta.reject(stage="data", code=554, text="Content rejected")
        with pytest.raises(smtplib.SMTPDataError) as data_refused:
            send(mta)
        assert data_refused.value.smtp_code == 554
        assert [m.recipients for m in mta.messages] == [["ann@example.com"]]


def test_defer_next_then_accept():
    with TestMTA() as mta:
        mta.defer_next(2)
        for _ in range(2):
            with pytest.raises(smtplib.SMTPDataError) as deferred:
                send(mta)
            assert deferred.value.smtp_code == 451
        send(mta)
        assert len(mta.wait_for()) == 1


def test_drop_connection_and_slow_replies():
    with TestMTA() as mta:
        mta.drop(stage="data", count=1)
        with pytest.raises(smtplib.SMTPServerDisconnected):
            send(mta)
        mta.slow(0.2, stage="rcpt")
        send(mta)
        assert len(mta.wait_for()) == 1


def test_greylisting_defers_the_first_attempt_only():
    with TestMTA() as mta:
        mta.greylist()
        with pytest.raises(smtplib.SMTPRecipientsRefused) as first:
            send(mta)
        assert first.value.recipients["ann@example.com"][0] == 450
        assert send(mta) == {}  # the retry passes
        assert len(mta.wait_for()) == 1


def test_size_limit_and_required_tls_and_auth():
    with TestMTA(message_size_limit=500) as mta:
        with pytest.raises(smtplib.SMTPSenderRefused) as too_big:  # SIZE=... announced by smtplib
            send(mta, body="Subject: big\r\n\r\n" + "x" * 1000 + "\r\n")
        assert too_big.value.smtp_code == 552
    with TestMTA(tls=True, require_tls=True) as mta:
        with pytest.raises(smtplib.SMTPSenderRefused) as no_tls:
            send(mta)
        assert no_tls.value.smtp_code == 530
        send(mta, tls=True)
        assert mta.wait_for()[0].tls.startswith("TLSv1.")
    with TestMTA(auth={"app": "secret"}, require_auth=True) as mta:
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            send(mta)
        with pytest.raises(smtplib.SMTPAuthenticationError):
            send(mta, login=("app", "wrong"))
        send(mta, login=("app", "secret"))
        [m] = mta.wait_for()
        assert m.auth == "app" and m.protocol == "ESMTPA"


def test_tls_and_auth_together():
    with TestMTA(tls=True, auth={"app": "secret"}) as mta:
        assert mta.ca_file and open(mta.ca_file).read().startswith("-----BEGIN CERTIFICATE-----")
        send(mta, tls=True, login=("app", "secret"))
        [m] = mta.wait_for()
        assert m.auth == "app" and m.protocol == "ESMTPSA" and m.tls


def test_relay_mode_delivers_through_the_real_scheduler_to_another_test_mta():
    with TestMTA() as downstream:
        with TestMTA(transport={"example.com": f"smtp:[127.0.0.1]:{downstream.port}"}) as gateway:
            send(gateway)
            gateway.wait_for()
            [relayed] = downstream.wait_for(timeout=10)
            assert relayed.sender == "app@app.example" and relayed.subject == "Welcome"
            assert relayed.raw.count(b"Received: from") == 2


def test_relay_mode_retries_after_a_deferral():
    with TestMTA() as downstream:
        downstream.defer_next(1)
        with TestMTA(transport={"example.com": f"smtp:[127.0.0.1]:{downstream.port}"},
                     minimal_backoff_time="1s", maximal_backoff_time="1s") as gateway:
            send(gateway)
            assert downstream.wait_for(timeout=15)[0].subject == "Welcome"


# -- the trio form -----------------------------------------------------------------


async def trio_send(mta, **kw):
    return await trio.to_thread.run_sync(lambda: send(mta, **kw))


async def test_trio_form_capture_match_and_faults():
    async with open_test_mta() as mta:
        mta.reject(rcpt="bad@*")
        refused = await trio_send(mta, rcpts=("bad@example.com", "ann@example.com"))
        assert list(refused) == ["bad@example.com"]
        [m] = await mta.wait_for(recipient="ann@example.com")
        assert m.subject == "Welcome"
        with pytest.raises(MTAAssertionError, match="1 message"):
            await mta.wait_for(count=2, timeout=0.1)
        mta.clear()
        mta.assert_nothing_sent()


async def test_trio_form_tls_auth_and_drop():
    async with open_test_mta(tls=True, auth={"u": "p"}) as mta:
        await trio_send(mta, tls=True, login=("u", "p"))
        [m] = await mta.wait_for()
        assert m.auth == "u" and m.tls
        mta.drop(stage="rcpt")
        with pytest.raises(smtplib.SMTPServerDisconnected):
            await trio_send(mta, tls=True, login=("u", "p"))


async def test_trio_fixture_from_the_plugin(trimail_trio_mta):
    await trio_send(trimail_trio_mta)
    assert (await trimail_trio_mta.wait_for())[0].subject == "Welcome"


def test_sync_fixture_from_the_plugin(trimail_mta):
    send(trimail_mta)
    assert trimail_mta.wait_for()[0].subject == "Welcome"


@pytest.mark.trimail(message_size_limit=300)
def test_marker_passes_options(trimail_mta):
    with pytest.raises(smtplib.SMTPSenderRefused):
        send(trimail_mta, body="Subject: x\r\n\r\n" + "y" * 600)


@pytest.mark.parametrize("round", [1, 2])
def test_session_fixture_is_cleared_between_tests(trimail_mta_session, round):
    trimail_mta_session.assert_nothing_sent()
    send(trimail_mta_session)
    trimail_mta_session.wait_for()


async def test_trio_form_defer_next_greylist_slow_and_size():
    async with open_test_mta(message_size_limit=400) as mta:
        mta.defer_next(1)
        with pytest.raises(smtplib.SMTPDataError):
            await trio_send(mta)
        mta.greylist()
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            await trio_send(mta)
        mta.slow(0.1, stage="mail")
        await trio_send(mta)
        assert len(await mta.wait_for()) == 1
        with pytest.raises(smtplib.SMTPSenderRefused):
            await trio_send(mta, body="Subject: big\r\n\r\n" + "x" * 800)
