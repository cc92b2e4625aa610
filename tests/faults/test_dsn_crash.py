"""A success notice (RFC 3461 NOTIFY=SUCCESS) is queued in the transaction that
records the delivery as sent, so a qmgr worker killed at any point of a run of such
deliveries neither loses a notice nor makes a second one: each message the client
got its ``250`` for is delivered, and is answered by exactly one notice (a notice
may arrive twice, as any message may when the kill falls between the peer's ``250``
and the commit, but then with the same Message-Id).  Counted at the downstream:
one sink takes both the relayed mail and the notices to the sender.
"""

from __future__ import annotations

import email
import email.policy
import os
import signal
import smtplib

from tests.faults.conftest import assert_serving, integrity_ok, queued, wait_until
from tests.faults.test_workers import Load, running
from tests.peers import Sink


def _submit(port: int, token: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.example")
        assert client.mail("alice@client.example", [f"ENVID={token}"])[0] == 250
        assert client.rcpt("rcpt@example.com", ["NOTIFY=SUCCESS,FAILURE"])[0] == 250
        assert client.data(f"Subject: token {token}\r\n\r\nx\r\n".encode())[0] == 250


def _notices(messages) -> dict[str, set[str]]:
    """Token (Original-Envelope-Id) -> the Message-Ids of the notices for it."""
    found: dict[str, set[str]] = {}
    for sender, _, content in messages:
        if sender not in ("", "<>"):
            continue
        notice = email.message_from_bytes(content, policy=email.policy.default)
        status = list(notice.iter_parts())[1].get_payload()[0]
        assert "Successful Mail Delivery Report" in notice["Subject"], notice["Subject"]
        found.setdefault(status["Original-Envelope-Id"], set()).add(notice["Message-Id"])
    return found


def _delivered(messages) -> set[str]:
    return {line.split(b" ", 2)[2].decode() for sender, _, content in messages if sender not in ("", "<>")
            for line in content.split(b"\r\n") if line.startswith(b"Subject: token ")}


def test_a_killed_qmgr_neither_loses_nor_doubles_a_success_notice(daemon):
    with Sink(delay=0.05) as sink:  # deliveries (and notices) are in flight at each kill
        d = daemon(smtpd_workers=1, relayhost=f"[127.0.0.1]:{sink.port}")
        with Load(d.port, 2, submit=_submit, each=400) as clients:
            for kill in range(2):  # mail comes in until the second
                base = len(clients.acknowledged)
                wait_until(lambda: len(clients.acknowledged) >= base + 15, timeout=60)
                wait_until(lambda: queued(d.queue_directory, "active") > 0, timeout=30)
                victim = running(d, "qmgr")[0]
                os.kill(victim, signal.SIGKILL)
                if kill:
                    clients.stop.set()  # the backlog drains (each client sent at most 400)
                d.proc.wait_log(rf"warning: process trimail/qmgr pid {victim} killed by signal 9")
                wait_until(lambda: running(d, "qmgr") and victim not in running(d, "qmgr"), timeout=60)
        wanted = set(clients.acknowledged)
        wait_until(lambda: wanted <= _delivered(sink.messages) and wanted <= set(_notices(sink.messages)),
                   timeout=120)
        wait_until(lambda: queued(d.queue_directory) == 0, timeout=60)  # no notice still to come
        notices = _notices(sink.messages)
        assert set(notices) <= wanted | set(_delivered(sink.messages))  # none for mail never accepted
        doubled = {token: ids for token, ids in notices.items() if len(ids) != 1}
        assert not doubled, doubled
        assert_serving(d)
    assert integrity_ok(d.queue_directory) == "ok"
