"""Backup MX hosts within one delivery attempt (Postfix's smtp_connect.c and
smtp_mx_session_limit): recipients soft-failed on one mail host go on to the next
in the same attempt.  Two MX hosts on port 25 of loopback addresses of our own, a
real DNS server, a real serve; the peers are the queue manager's test fleet
(tests/scheduler/fleet.py)."""

from __future__ import annotations

import os
import smtplib
from collections.abc import Iterator

import pytest
import trio

from tests.conftest import wait_for
from tests.delivery.test_delivery import queue, recipient_status, send, wait_empty
from tests.scheduler.fleet import Fleet, Peer

RCPTS = ["r1@far.example", "r2@far.example"]
MX1, MX2 = "127.0.70.21", "127.0.70.22"  # the mail hosts' addresses for mx.Targets (never bound)


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    if os.geteuid() != 0:
        pytest.skip("binding port 25 needs root")
    with Fleet() as running:
        yield running


def two_mx(fleet: Fleet, **primary: object) -> tuple[Peer, Peer, dict]:
    """The primary (with *primary* behaviour) and the backup MX host of far.example,
    both on port 25, and the zone naming them."""
    mx1, mx2 = fleet.peer("mx1", **primary), fleet.peer("mx2")
    zone = {"far.example": {"MX": ["10 mx1.far.example.", "20 mx2.far.example."]},
            "mx1.far.example": {"A": [mx1.host]}, "mx2.far.example": {"A": [mx2.host]}}
    return mx1, mx2, zone


@pytest.mark.parametrize("trouble", ["450 at RCPT", "lost at DATA"])
async def test_recipients_soft_failed_on_the_first_mx_go_to_the_next_in_the_same_attempt(
        start_mta, fleet, trouble):
    if trouble == "450 at RCPT":
        primary, backup, zone = two_mx(fleet, rcpt_reply=b"450 4.2.1 mailbox busy, try later\r\n")
    else:
        primary, backup, zone = two_mx(fleet, drop_at_data=True)
    srv = await start_mta(zone)
    await send(srv, "a@client.example", RCPTS)
    await wait_empty(srv, timeout=10)  # delivered now, not deferred for minimal_backoff_time
    assert sorted(backup.recipients) == RCPTS
    assert primary.recipients == [] and primary.sessions == 1 and backup.sessions == 1


async def test_smtp_mx_session_limit_1_leaves_them_for_the_retry(start_mta, fleet):
    _, backup, zone = two_mx(fleet, rcpt_reply=b"450 4.2.1 mailbox busy, try later\r\n")
    srv = await start_mta(zone, smtp_mx_session_limit="1")
    queue_id = await send(srv, "a@client.example", RCPTS)
    await wait_for(lambda: all(s == "deferred" for s, _ in recipient_status(srv, queue_id).values())
                   and len(recipient_status(srv, queue_id)) == 2, timeout=10)
    assert backup.connections == 0
    assert "450 4.2.1 mailbox busy" in recipient_status(srv, queue_id)["r1@far.example"][1]


async def test_a_hard_failure_on_the_first_mx_is_final(start_mta, fleet):
    """Only soft failures move on: a 550 from the first host is the answer."""
    primary, backup, zone = two_mx(fleet, rcpt_reply=b"550 5.1.1 no such user\r\n")
    srv = await start_mta(zone, mydestination="mx.test.example")
    await send(srv, "<>", RCPTS)  # (a null sender: no bounce to deliver)
    await wait_for(lambda: not queue(srv), timeout=10)
    assert backup.connections == 0 and primary.rcpt_refused == 2


async def test_a_backup_session_looks_past_the_host_it_already_had_within_the_address_limit():
    """mx.Targets with skip: the address already used is neither yielded nor counted,
    and it does not fill the lookups of its preference group (smtp_mx_address_limit 1)."""
    from trimail.delivery.mx import Targets
    from trimail.net.dns import MailHost

    class Resolver:
        async def addresses(self, name: str) -> list[str]:
            return {"mx1.far.example": [MX1], "mx2.far.example": [MX2]}[name]

    hosts = [MailHost("mx1.far.example", 10), MailHost("mx2.far.example", 10)]
    targets = Targets(Resolver(), "far.example", hosts, is_self=lambda a: False, address_limit=1,  # type: ignore[arg-type]
                      skip=frozenset({MX1}))
    assert [t.address async for t in targets] == [MX2]


async def test_the_soft_failure_logged_on_the_way_to_the_backup_is_printable_and_bounded(start_mta, fleet, caplog):
    """Red team 33a: that line logged the primary's reply as it came, so any domain's
    first MX host could put terminal escapes, NULs and carriage returns into the mail
    log, and 4 MB in one line (the reply parser's bound); every status= line was
    already made printable and cut to REPLY_TEXT_LIMIT."""
    hostile = (b"451-4.3.0 \x1b[31mRED\x1b[0m \x00NUL \rCR \x07bell\r\n" + b"451-4.3.0 " + b"x" * 1000 + b"\r\n") * 5 \
        + b"451 4.3.0 end\r\n"
    primary, backup, zone = two_mx(fleet, rcpt_reply=hostile)
    srv = await start_mta(zone)
    caplog.set_level("INFO", logger="trimail.smtp")
    await send(srv, "a@client.example", RCPTS)
    await wait_empty(srv, timeout=10)
    assert sorted(backup.recipients) == RCPTS
    [line] = [r.getMessage() for r in caplog.records if "RED" in r.getMessage() and "status=" not in r.getMessage()]
    assert line.isprintable() and "451 4.3.0" in line and len(line) < 1100, repr(line[:200])


async def test_a_recipient_with_dsn_parameters_soft_failed_alone_goes_to_the_next_mx(start_mta, fleet):
    """The backup session takes only the recipients that moved; their RCPT TO
    parameters (RFC 3461 NOTIFY, ORCPT) are the envelope's per recipient, and the
    envelope handed to the backup kept all of them: one recipient moving of two made
    the lists differ, the backup session failed, and the recipient waited for the
    retry."""
    busy = b"450 4.2.1 mailbox busy, try later\r\n"
    primary, backup, zone = two_mx(fleet, rcpt_reply=lambda address: busy if address == RCPTS[0] else b"")
    srv = await start_mta(zone)

    def submit() -> None:
        with smtplib.SMTP("127.0.0.1", srv.addresses[0].port, timeout=30) as client:
            client.ehlo("client.example")
            client.mail("a@client.example")
            for rcpt in RCPTS:
                assert client.rcpt(rcpt, ["NOTIFY=FAILURE", f"ORCPT=rfc822;{rcpt}"])[0] == 250
            assert client.data(b"Subject: test\r\n\r\nhello\r\n")[0] == 250

    await trio.to_thread.run_sync(submit)
    await wait_empty(srv, timeout=10)  # delivered now, not deferred for minimal_backoff_time
    assert primary.recipients == [RCPTS[1]] and backup.recipients == [RCPTS[0]]
