"""RFC 3461 end to end, as Postfix does it: the DSN parameters a client gives at MAIL
and RCPT are queued with the message, passed on to a next hop that offers DSN,
answered with a success notice (Action: relayed) when the next hop does not, or
delivered, and they decide who is in a bounce or delay warning and what it says
(Original-Envelope-Id, Original-Recipient, RET=HDRS).  Real serve (start_mta), real
peers: aiosmtpd sinks (no DSN) and the scripted peer (DSN offered or not)."""

from __future__ import annotations

import email
import email.policy
import smtplib

import trio

from tests.conftest import wait_for
from tests.delivery.outbound_peer import ScriptedPeer
from tests.delivery.test_delivery import parse_dsn, queue, wait_empty
from tests.peers import Sink

HOST = "127.0.40.1"  # this module's loopback addresses
SENDERS = "127.0.40.2"  # where notifications to alice@client.example go
PEER = "127.0.40.3"
BODY = b"From: alice@client.example\r\nSubject: dsn test\r\n\r\nthe body line\r\n"


def submit(srv, mail_options: list[str], rcpts: list[tuple[str, list[str]]]) -> str:
    """One transaction with per-recipient RCPT options; the queue ID."""
    address = srv.addresses[0]
    with smtplib.SMTP(address.host, address.port, timeout=30) as client:
        client.ehlo("client.example")
        assert client.has_extn("dsn")
        assert client.mail("alice@client.example", mail_options)[0] == 250
        for rcpt, options in rcpts:
            assert client.rcpt(rcpt, options)[0] == 250
        code, reply = client.data(BODY)
        assert code == 250
        return reply.decode().rsplit(" ", 1)[1]


async def send(srv, mail_options: list[str], rcpts: list[tuple[str, list[str]]]) -> str:
    return await trio.to_thread.run_sync(submit, srv, mail_options, rcpts)


def notices(sink: Sink) -> list[bytes]:
    return [content for sender, _, content in sink.messages if sender in ("", "<>")]


def status_fields(content: bytes) -> tuple[dict, list[dict]]:
    """The per-message fields and each recipient's fields of a notification."""
    message = email.message_from_bytes(content, policy=email.policy.default)
    status = list(message.iter_parts())[1]
    blocks = status.get_payload()
    return dict(blocks[0].items()), [dict(b.items()) for b in blocks[1:]]


async def start(start_mta, senders: Sink, nexthop: str, **params):
    return await start_mta(smtpd_listen=f"{HOST}:0", **params, transport_maps=(
        f"inline:{{ client.example=smtp:[{SENDERS}]:{senders.port}, far.example=smtp:{nexthop} }}"))


async def test_notify_decides_who_is_in_the_bounce(start_mta):
    refuse = "550 5.1.1 no such user"
    with Sink(SENDERS) as senders, Sink(PEER, rules={"never": refuse, "nofail": refuse, "plain": refuse,
                                                     "failure": refuse}) as far:
        srv = await start(start_mta, senders, f"[{PEER}]:{far.port}")
        await send(srv, [], [("never@far.example", ["NOTIFY=NEVER"]),
                             ("nofail@far.example", ["NOTIFY=SUCCESS,DELAY"]),
                             ("failure@far.example", ["NOTIFY=FAILURE"]),
                             ("plain@far.example", [])])  # no NOTIFY: failures reported, as before
        await wait_empty(srv)
        [bounce] = notices(senders)
        _, recipients, _ = parse_dsn(bounce)
        assert sorted(r[0] for r in recipients) == ["rfc822; failure@far.example", "rfc822; plain@far.example"]
        assert b"never@" not in bounce and b"nofail@" not in bounce


async def test_bounce_says_envid_and_orcpt_and_returns_headers_for_ret_hdrs(start_mta):
    with Sink(SENDERS) as senders, Sink(PEER, rules={"gone": "550 5.1.1 no such user"}) as far:
        srv = await start(start_mta, senders, f"[{PEER}]:{far.port}")
        await send(srv, ["RET=HDRS", "ENVID=QQ+2B314"], [("gone@far.example", ["ORCPT=rfc822;Old+2BName@far.example"]),
                                                         ("gone2@far.example", [])])
        await wait_empty(srv)
        [bounce] = notices(senders)
        per_message, [first] = status_fields(bounce)
        assert per_message["Original-Envelope-Id"] == "QQ+314"
        assert first["Original-Recipient"] == "rfc822;Old+Name@far.example"
        assert first["Final-Recipient"] == "rfc822; gone@far.example"
        message = email.message_from_bytes(bounce, policy=email.policy.default)
        assert list(message.iter_parts())[2].get_content_type() == "text/rfc822-headers"
        assert b"Subject: dsn test" in bounce and b"the body line" not in bounce
        assert [r for _, r, _ in far.messages] == [["gone2@far.example"]]


async def test_bounce_without_dsn_parameters_is_as_before(start_mta):
    with Sink(SENDERS) as senders, Sink(PEER, rules={"gone": "550 5.1.1 no such user"}) as far:
        srv = await start(start_mta, senders, f"[{PEER}]:{far.port}")
        await send(srv, [], [("gone@far.example", [])])
        await wait_empty(srv)
        [bounce] = notices(senders)
        per_message, [first] = status_fields(bounce)
        assert "Original-Envelope-Id" not in per_message
        assert first["Original-Recipient"] == "rfc822;gone@far.example"
        assert b"the body line" in bounce  # the whole message: RET=FULL is the default


async def test_dsn_parameters_go_to_a_next_hop_that_offers_dsn(start_mta, nursery):
    peer = ScriptedPeer(extensions=("PIPELINING", "8BITMIME", "DSN"))
    port = await nursery.start(peer.run, PEER)
    with Sink(SENDERS) as senders:
        srv = await start(start_mta, senders, f"[{PEER}]:{port}")
        await send(srv, ["RET=HDRS", "ENVID=a+2Bb"], [("one@far.example", ["NOTIFY=success,failure",
                                                                            "ORCPT=rfc822;x+2By@far.example"]),
                                                      ("two@far.example", [])])
        await wait_empty(srv)
        [received] = peer.received
        assert received.mail.endswith(b" RET=HDRS ENVID=a+2Bb")
        assert received.rcpts == [b"RCPT TO:<one@far.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x+2By@far.example",
                                  b"RCPT TO:<two@far.example>"]
        assert notices(senders) == []  # the next hop answers NOTIFY=SUCCESS, not us


async def test_success_is_relayed_when_the_next_hop_has_no_dsn(start_mta, nursery):
    peer = ScriptedPeer(extensions=("PIPELINING", "8BITMIME"))
    port = await nursery.start(peer.run, PEER)
    with Sink(SENDERS) as senders:
        srv = await start(start_mta, senders, f"[{PEER}]:{port}")
        await send(srv, ["ENVID=e1"], [("one@far.example", ["NOTIFY=SUCCESS", "ORCPT=rfc822;first@far.example"]),
                                       ("two@far.example", ["NOTIFY=FAILURE"]), ("three@far.example", [])])
        await wait_empty(srv)
        [received] = peer.received
        assert b"NOTIFY" not in received.mail + b"".join(received.rcpts) and b"ENVID" not in received.mail
        await wait_for(lambda: len(notices(senders)) == 1)
        [notice] = notices(senders)
        message, recipients, returned = parse_dsn(notice)
        assert message["Subject"] == "Successful Mail Delivery Report"
        assert recipients == [("rfc822; one@far.example", "relayed", "2.0.0")]
        per_message, [first] = status_fields(notice)
        assert per_message["Original-Envelope-Id"] == "e1"
        assert first["Original-Recipient"] == "rfc822;first@far.example"
        assert first["Remote-MTA"] == f"dns; {PEER}"
        assert returned.get_content_type() == "text/rfc822-headers" and b"the body line" not in notice
        assert queue(srv) == []


async def test_local_delivery_with_notify_success_is_reported_delivered(start_mta):
    with Sink(SENDERS) as senders:
        srv = await start_mta(smtpd_listen=f"{HOST}:0", alias_maps="", local_recipient_maps="",
                              transport_maps=f"inline:{{ client.example=smtp:[{SENDERS}]:{senders.port} }}")
        await send(srv, [], [("user@mx.test.example", ["NOTIFY=SUCCESS"]), ("quiet@mx.test.example", [])])
        await wait_for(lambda: len(notices(senders)) == 1, 20)
        await wait_empty(srv)
        message, recipients, _ = parse_dsn(notices(senders)[0])
        assert message["Subject"] == "Successful Mail Delivery Report"
        assert recipients == [("rfc822; user@mx.test.example", "delivered", "2.0.0")]


async def test_notify_without_delay_gets_no_delay_warning(start_mta):
    with Sink(SENDERS) as senders, Sink(PEER, rules={"slow": "450 4.2.0 try later",
                                                     "slow2": "450 4.2.0 try later"}) as far:
        srv = await start(start_mta, senders, f"[{PEER}]:{far.port}", delay_warning_time="0.001s")
        await send(srv, [], [("slow@far.example", ["NOTIFY=FAILURE"])])
        await send(srv, [], [("slow2@far.example", ["NOTIFY=DELAY"])])  # the control: warned

        def both_deferred() -> bool:
            mine = [m for m in queue(srv) if m.sender]
            return len(mine) == 2 and all(r.status == "deferred" for m in mine for r in m.recipients)
        await wait_for(both_deferred, 20)  # each warning is queued with its message's deferral
        await wait_for(lambda: srv.scheduler.idle.is_set() and not [m for m in queue(srv) if not m.sender], 20)
        [warning] = notices(senders)
        message, recipients, _ = parse_dsn(warning)
        assert message["Subject"] == "Delayed Mail (still being retried)"
        assert recipients == [("rfc822; slow2@far.example", "delayed", "4.2.0")]


async def test_a_bcc_copy_goes_to_a_dsn_next_hop_with_notify_never(start_mta, nursery, tmp_path):
    """Postfix's cleanup gives a BCC action's copy NOTIFY=NEVER, and its SMTP client
    says so to a next hop that offers DSN, so no one reports on the hidden copy."""
    rules = tmp_path / "checks"
    rules.write_text("/^Subject: dsn test/ BCC hidden@far.example\n")
    peer = ScriptedPeer(extensions=("PIPELINING", "8BITMIME", "DSN"))
    port = await nursery.start(peer.run, PEER)
    with Sink(SENDERS) as senders:
        srv = await start(start_mta, senders, f"[{PEER}]:{port}", header_checks=f"regexp:{rules}")
        await send(srv, [], [("named@far.example", [])])
        await wait_empty(srv)
        assert sorted(rcpt for received in peer.received for rcpt in received.rcpts) == [
            b"RCPT TO:<hidden@far.example> NOTIFY=NEVER", b"RCPT TO:<named@far.example>"]


async def test_a_virtual_alias_passes_its_recipients_dsn_parameters_to_each_address(start_mta, nursery):
    """Postfix's cleanup copies NOTIFY and ORCPT to each address virtual_alias_maps makes
    of a recipient; the recipient beside it keeps its own (none)."""
    peer = ScriptedPeer(extensions=("PIPELINING", "8BITMIME", "DSN"))
    port = await nursery.start(peer.run, PEER)
    with Sink(SENDERS) as senders:
        srv = await start(start_mta, senders, f"[{PEER}]:{port}",
                          virtual_alias_maps="inline:{ { list@far.example = a@far.example, b@far.example } }")
        await send(srv, [], [("list@far.example", ["NOTIFY=DELAY", "ORCPT=rfc822;list@far.example"]),
                             ("c@far.example", [])])
        await wait_empty(srv)
        assert sorted(rcpt for received in peer.received for rcpt in received.rcpts) == [
            b"RCPT TO:<a@far.example> NOTIFY=DELAY ORCPT=rfc822;list@far.example",
            b"RCPT TO:<b@far.example> NOTIFY=DELAY ORCPT=rfc822;list@far.example",
            b"RCPT TO:<c@far.example>"]
