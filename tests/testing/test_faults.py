"""More faults: at connect (refused, 421, slow banner), at AUTH, at STARTTLS
(handshake failure, expired or untrusted certificate), a hang-up in the middle of
DATA after N bytes, and probabilistic faults with a seed; real TestMTAs, smtplib and
raw sockets."""

from __future__ import annotations

import random
import smtplib
import socket
import ssl
import time

import pytest
import trio

from trimail.testing import TestMTA, open_test_mta

HOST = "127.0.41.6"


def trusting(mta):
    """The client context trusting the test CA (its certificate names 127.0.0.1, not HOST)."""
    context = mta.ssl_context()
    context.check_hostname = False
    return context


def client(mta, timeout=30.0):
    return smtplib.SMTP(HOST, mta.port, local_hostname="app.example", timeout=timeout)


def send(mta, rcpts=("ann@example.com",), body="Subject: hi\r\n\r\nHello\r\n"):
    with client(mta) as smtp:
        return smtp.sendmail("app@app.example", list(rcpts), body)


@pytest.fixture
def mta():
    with TestMTA(smtpd_listen=f"{HOST}:0") as mta:
        yield mta


@pytest.fixture
def tls_mta():
    with TestMTA(smtpd_listen=f"{HOST}:0", tls=True, auth={"app": "secret"}) as mta:
        yield mta


# -- at connect ---------------------------------------------------------------------


def test_refused_connection_closes_before_any_banner(mta):
    fault = mta.drop(stage="connect", count=1)
    with pytest.raises(smtplib.SMTPServerDisconnected):
        client(mta)
    send(mta)  # used up: the next connection is served
    first, second = mta.wait_for_attempts(2)
    assert first.exchanges == [] and first.ended == "dropped (fault)" and fault.hits == 1
    assert second.ended == "quit"


def test_421_banner(mta):
    mta.reject(stage="connect", code=421, text="Too busy, come back later")
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        client(mta)
    assert (refused.value.smtp_code, refused.value.smtp_error) == (421, b"4.3.2 Too busy, come back later")
    [attempt] = mta.wait_for_attempts(1)
    assert attempt.ended == "closed by the server: 421 4.3.2 Too busy, come back later"


def test_slow_banner(mta):
    mta.slow(0.5, stage="connect", count=1)
    with pytest.raises(smtplib.SMTPServerDisconnected, match="timed out"):
        client(mta, timeout=0.1)  # the banner is not there in time
    mta.slow(0.3, stage="connect", count=1)
    started = time.monotonic()
    with socket.create_connection((HOST, mta.port), timeout=30) as raw:
        assert raw.recv(100).startswith(b"220 ")
    assert time.monotonic() - started >= 0.3


def test_connect_fault_matches_the_client_address(mta):
    mta.reject(client="192.0.2.*", code=554, text="Not you")
    send(mta)  # from 127.0.0.1: not matched
    mta.reject(client="127.0.0.*", code=554, text="You")
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        client(mta)
    assert refused.value.smtp_code == 554


# -- at AUTH -------------------------------------------------------------------------


def test_auth_rejected_with_a_chosen_code(tls_mta):
    fault = tls_mta.reject(user="app", code=535, text="Password expired")
    with client(tls_mta) as smtp:
        smtp.starttls(context=trusting(tls_mta))
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            smtp.login("app", "secret")
    assert refused.value.smtp_code == 535 and refused.value.smtp_error == b"5.7.8 Password expired"
    assert fault.hits == 2  # smtplib tried PLAIN, then LOGIN
    tls_mta.clear()
    tls_mta.reject(stage="auth", code=454, text="Try later", count=2)
    with client(tls_mta) as smtp:
        smtp.starttls(context=trusting(tls_mta))
        with pytest.raises(smtplib.SMTPAuthenticationError) as deferred:
            smtp.login("app", "secret")
        assert deferred.value.smtp_error == b"4.7.0 Try later"
        smtp.login("app", "secret")  # the fault is used up: the real check passes


# -- at STARTTLS -----------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "error", "why"), [
    ("handshake", ssl.SSLError, "SSL"),  # the server breaks off: EOF (or an alert) in the handshake
    ("expired", ssl.SSLCertVerificationError, "certificate has expired"),
    ("untrusted", ssl.SSLCertVerificationError, "unable to get local issuer certificate"),
])
def test_starttls_failures(tls_mta, kind, error, why):
    fault = tls_mta.fail_tls(kind, count=1)
    with client(tls_mta) as smtp, pytest.raises(error) as failed:
        smtp.starttls(context=tls_mta.ssl_context())
    assert why in str(failed.value) and fault.hits == 1
    assert kind != "handshake" or not isinstance(failed.value, ssl.SSLCertVerificationError)
    with client(tls_mta) as smtp:  # used up: the real certificate, trusted
        smtp.starttls(context=trusting(tls_mta))
        smtp.login("app", "secret")
    first, second = tls_mta.wait_for_attempts(2)
    assert first.ended == "TLS handshake failed" and not first.tls
    assert second.tls and "AUTH PLAIN ***" in second.commands


def test_tls_faults_need_tls(mta):
    with pytest.raises(ValueError, match="tls=True"):
        mta.fail_tls("expired")


# -- in the middle of DATA ----------------------------------------------------------------


def test_hang_up_after_n_bytes_of_the_message(mta):
    fault = mta.drop(after_bytes=1000)
    with socket.create_connection((HOST, mta.port), timeout=30) as raw:
        replies = raw.makefile("rb")
        assert replies.readline().startswith(b"220")

        def command(line: bytes) -> bytes:
            raw.sendall(line)
            return replies.readline()

        assert command(b"HELO app.example\r\n").startswith(b"250")
        for size, outcome in ((999, b"250 2.0.0 Ok: queued as "), (1001, b"")):
            assert command(b"MAIL FROM:<app@app.example>\r\n").startswith(b"250")
            assert command(b"RCPT TO:<ann@example.com>\r\n").startswith(b"250")
            assert command(b"DATA\r\n").startswith(b"354")
            content = b"Subject: cut\r\n\r\n" + b"x" * (size - 18) + b"\r\n"
            assert len(content) == size
            assert command(content + b".\r\n").startswith(outcome)  # b"": the connection is gone
    assert len(mta.messages) == 1 and fault.hits == 1
    [attempt] = mta.wait_for_attempts(1)
    assert attempt.ended == "dropped (fault)" and attempt.message_bytes == 1001


def test_hang_up_after_n_bytes_of_a_message_sent_in_bdat_chunks(mta):
    fault = mta.drop(after_bytes=1000)
    with socket.create_connection((HOST, mta.port), timeout=30) as raw:
        replies = raw.makefile("rb")
        assert replies.readline().startswith(b"220")
        raw.sendall(b"HELO app.example\r\n")
        assert replies.readline().startswith(b"250")
        for size, outcome in ((999, b"250 2.0.0 Ok: 999 bytes queued as "), (1001, b"")):
            content = b"Subject: cut\r\n\r\n" + b"x" * (size - 18) + b"\r\n"
            raw.sendall(b"MAIL FROM:<app@app.example>\r\nRCPT TO:<ann@example.com>\r\n"
                        b"BDAT 500\r\n" + content[:500] + b"BDAT %d LAST\r\n" % (size - 500) + content[500:])
            got = [replies.readline() for _ in range(4)]
            assert got[3].startswith(outcome), got  # b"": the connection is gone
    assert len(mta.messages) == 1 and fault.hits == 1
    [attempt] = mta.wait_for_attempts(1)
    assert attempt.ended == "dropped (fault)" and attempt.message_bytes == 1001


def test_hang_up_in_data_seen_by_smtplib(mta):
    mta.drop(after_bytes=10_000, count=1)
    with pytest.raises(smtplib.SMTPServerDisconnected):
        send(mta, body="Subject: big\r\n\r\n" + "y" * 100_000 + "\r\n")
    send(mta)
    assert [m.subject for m in mta.wait_for()] == ["hi"]
    with pytest.raises(ValueError, match="after_bytes"):
        mta.drop(stage="rcpt", after_bytes=5)


# -- probabilistic, with a seed ---------------------------------------------------------------


def refused_pattern(seed: int, probability: float = 0.3, n: int = 30) -> tuple[list[bool], int]:
    with TestMTA(smtpd_listen=f"{HOST}:0") as mta:
        fault = mta.reject(rcpt="*@example.com", probability=probability, seed=seed)
        with client(mta) as smtp:
            smtp.ehlo()
            smtp.mail("app@app.example")
            pattern = [smtp.rcpt(f"user{i}@example.com")[0] == 550 for i in range(n)]
        return pattern, fault.hits


def test_probabilistic_faults_are_deterministic_for_a_seed():
    pattern, hits = refused_pattern(seed=1)
    draws = random.Random(1)
    assert pattern == [draws.random() < 0.3 for _ in range(30)]
    assert hits == sum(pattern) and 0 < hits < 30
    assert refused_pattern(seed=1) == (pattern, hits)
    assert refused_pattern(seed=2)[0] != pattern
    with pytest.raises(ValueError, match="probability"):
        TestMTA().reject(probability=1.5)


# -- the trio form --------------------------------------------------------------------------------


async def test_trio_form_connect_and_data_faults():
    async with open_test_mta(smtpd_listen=f"{HOST}:0") as mta:
        mta.reject(stage="connect", code=421, count=1)
        with pytest.raises(smtplib.SMTPConnectError):
            await trio.to_thread.run_sync(client, mta)
        mta.drop(after_bytes=50, count=1)
        with pytest.raises(smtplib.SMTPServerDisconnected):
            await trio.to_thread.run_sync(lambda: send(mta, body="Subject: x\r\n\r\n" + "z" * 100 + "\r\n"))
        await trio.to_thread.run_sync(send, mta)
        attempts = await mta.wait_for_attempts(3)
        assert [a.ended for a in attempts][:2] == ["closed by the server: 421 4.3.2 Rejected by the test MTA",
                                                   "dropped (fault)"]
        assert len(await mta.wait_for(exactly=1)) == 1
