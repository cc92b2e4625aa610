"""Source routes end to end: accepted and ignored (RFC 5321 appendix C, Postfix), in
MAIL and RCPT, with the relay decision and the stored address those of the mailbox
after the route."""

from __future__ import annotations

import smtplib

import trio

from trimail.queue.store import Store

OUTSIDE = "127.0.0.2"


def transaction(port: int, sender: str, recipients: list[str]) -> tuple[list[tuple[int, bytes]], str | None]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(OUTSIDE, 0)) as client:
        client.ehlo("client.example")
        replies = [client.docmd("MAIL", f"FROM:<{sender}>")]
        replies += [client.docmd("RCPT", f"TO:<{rcpt}>") for rcpt in recipients]
        if any(code == 250 for code, _ in replies[1:]):
            code, text = client.data(b"Subject: route\r\n\r\nx\r\n")
            return replies, text.decode().rsplit(" ", 1)[1] if code == 250 else None
        return replies, None


async def test_an_outside_client_may_use_a_source_route_to_a_local_mailbox(start_mta):
    srv = await start_mta(mynetworks="127.0.0.1/32", myhostname="gw.example", mydestination="gw.example",
                          local_recipient_maps="inline:{ user=x }", master_service_disable="qmgr")
    replies, queue_id = await trio.to_thread.run_sync(
        transaction, srv.addresses[0].port, "@relay.example:alice@client.example",
        ["@a.example,@b.example:user@gw.example", "@[IPv6:::1]:user@gw.example",
         "@[192.0.2.1]:user@gw.example", "@gw.example:victim@outside.example"])
    assert [code for code, _ in replies] == [250, 250, 250, 250, 450]
    assert replies[4][1] == b"4.7.1 <victim@outside.example>: Relay access denied"
    [info] = Store.open(srv.config.queue_directory, readonly=True).list_messages_by_id([queue_id])
    assert info.sender == "alice@client.example"
    # all three name one mailbox once the routes are stripped: queued once (cleanup's duplicate filter)
    assert [r.address for r in info.recipients] == ["user@gw.example"]
