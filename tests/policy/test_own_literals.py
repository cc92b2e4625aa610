"""End to end: mail to an address literal naming one of serve's own listener
addresses (or a proxy_interfaces address) is local mail, accepted from anyone and
stored and routed locally; any other literal is still relaying (Postfix's resolve_local)."""

from __future__ import annotations

import smtplib

import trio

from trimail.delivery.route import Router
from trimail.queue.store import Store

OUTSIDE = "127.0.0.2"


def rcpts(port: int, recipients: list[str]) -> tuple[list[int], str | None]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(OUTSIDE, 0)) as client:
        client.ehlo("client.example")
        client.docmd("MAIL", "FROM:<alice@client.example>")
        codes = [client.docmd("RCPT", f"TO:<{rcpt}>")[0] for rcpt in recipients]
        if 250 not in codes:
            return codes, None
        code, text = client.data(b"Subject: literal\r\n\r\nx\r\n")
        return codes, text.decode().rsplit(" ", 1)[1] if code == 250 else None


async def test_an_outside_client_may_mail_our_own_address_literals_and_no_other(start_mta):
    srv = await start_mta(mynetworks="127.0.0.1/32", myhostname="gw.example", mydestination="gw.example",
                          smtpd_listen="127.0.0.1:0, [::1]:0", proxy_interfaces="192.0.2.7",
                          local_recipient_maps="inline:{ user=x }", master_service_disable="qmgr")
    own = ["user@[127.0.0.1]", "user@[IPv6:::1]", "user@[192.0.2.7]"]
    foreign = ["user@[127.0.0.3]", "user@[192.0.2.1]", "user@[IPv6:::2]", "user@[IPv6:2001:db8::1]",
               '"victim@outside.example"@[127.0.0.1]', "outside.example!victim@[IPv6:::1]", "nobody@[127.0.0.1]"]
    codes, queue_id = await trio.to_thread.run_sync(rcpts, srv.addresses[0].port, own + foreign)
    assert codes == [250] * 3 + [450] * 6 + [550]
    [info] = Store.open(srv.config.queue_directory, readonly=True).list_messages_by_id([queue_id])
    router = Router(srv.config)
    assert sorted(r.address.lower() for r in info.recipients) == sorted(a.lower() for a in own)
    assert {router.route(r.address).transport for r in info.recipients} == {"local"}
