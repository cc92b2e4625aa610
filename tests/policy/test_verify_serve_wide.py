"""One address-verification cache per serve (Postfix has one verify(8) per
instance): an answer a probe got through one listener answers the same question on
every other listener, and a reload keeps it.  A real serve with an smtp and an smtps
listener, its internal server a trio peer that counts its connections."""

from __future__ import annotations

import smtplib
import ssl
import subprocess
import sys

import trio

from tests.policy.test_verify import InternalServer, rcpt_replies

UNKNOWN = "nobody@remote.example"


def smtps_rcpt(port: int, recipient: str) -> tuple[int, str]:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP_SSL("127.0.0.1", port, timeout=30, context=context) as client:
        client.ehlo("client.example")
        client.login("alice", "correct horse")
        client.docmd("MAIL", "FROM:<alice@client.example>")
        code, text = client.docmd("RCPT", f"TO:<{recipient}>")
    return code, text.decode()


async def test_a_probe_answer_is_shared_by_every_listener_and_survives_reload(submission, nursery):
    peer = InternalServer()
    await nursery.start(peer.run)
    srv = await submission(relayhost=f"[127.0.0.1]:{peer.port}", unverified_recipient_reject_code="550",
                           relay_domains="remote.example", smtpd_recipient_restrictions="reject_unverified_recipient",
                           address_verify_poll_delay="1s")
    smtp_port = srv.addresses_by_kind["smtp"][0].port
    smtps_port = srv.addresses_by_kind["smtps"][0].port
    [(code, text)] = await trio.to_thread.run_sync(rcpt_replies, smtp_port, [UNKNOWN])
    assert code == 550 and "undeliverable address" in text
    assert peer.connections == 1
    # the smtps listener has its own restrictions context, but the same cache
    code, text = await trio.to_thread.run_sync(smtps_rcpt, smtps_port, UNKNOWN)
    assert code == 550 and "undeliverable address" in text
    assert peer.connections == 1
    reloaded = await trio.to_thread.run_sync(lambda: subprocess.run(
        [sys.executable, "-m", "trimail", "reload", "-c", srv.config.source], check=False, capture_output=True,
        timeout=60))
    assert reloaded.returncode == 0, reloaded.stderr
    assert srv.reloads == 1
    [(code, text)] = await trio.to_thread.run_sync(rcpt_replies, smtp_port, [UNKNOWN])
    assert code == 550 and "undeliverable address" in text
    code, _ = await trio.to_thread.run_sync(smtps_rcpt, smtps_port, UNKNOWN)
    assert code == 550
    assert peer.connections == 1 and peer.rcpts == [UNKNOWN]
