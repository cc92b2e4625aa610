"""Access-table actions FILTER and BCC end to end (issue 14, section 2): a gateway
that routes mail through a content filter must not be bypassed, and a BCC copy
must arrive.  Real serve with its queue manager, aiosmtpd sinks as the relayhost
and the content filter."""

from __future__ import annotations

import smtplib

import trio

from tests.delivery.test_delivery import queue, send, wait_empty
from tests.peers import Sink


async def test_filter_sends_the_whole_message_to_the_content_filter(start_mta):
    with Sink() as relay, Sink() as content_filter:
        access = (f"inline:{{ {{ r@remote.example=FILTER smtp:[127.0.0.1]:{content_filter.port} }}, "
                  f"{{ late@remote.example=FILTER smtp:[127.0.0.1]:1 }} }}")
        srv = await start_mta(relayhost=f"[127.0.0.1]:{relay.port}", mynetworks="127.0.0.1/32",
                              smtpd_recipient_restrictions=f"check_recipient_access {access}, permit_mynetworks")
        await send(srv, "a@client.example", ["other@remote.example", "r@remote.example"])
        await wait_empty(srv)
        # Postfix: FILTER applies to every recipient of the message, not only the one that matched
        assert sorted(content_filter.recorder.recipients()) == ["other@remote.example", "r@remote.example"]
        assert relay.messages == []
        await send(srv, "a@client.example", ["plain@remote.example"])
        await wait_empty(srv)
        assert relay.recorder.recipients() == ["plain@remote.example"]


async def test_filter_to_an_unknown_transport_is_a_server_configuration_error(start_mta, caplog):
    srv = await start_mta(master_service_disable="qmgr", mynetworks="127.0.0.1/32",
                          smtpd_recipient_restrictions="check_recipient_access "
                                                       "inline:{ { r@remote.example=FILTER amavis:[127.0.0.1]:10024 } }")

    def rcpt() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", srv.addresses[0].port, timeout=30) as client:
            client.ehlo("c.example")
            client.docmd("MAIL", "FROM:<a@client.example>")
            return client.docmd("RCPT", "TO:<r@remote.example>")

    code, text = await trio.to_thread.run_sync(rcpt)
    assert (code, text) == (451, b"4.3.5 <r@remote.example>: Recipient address rejected: Server configuration error")
    assert "unknown transport 'amavis'" in caplog.text
    assert queue(srv) == []


async def test_bcc_sends_a_copy_to_the_extra_recipient(start_mta):
    with Sink() as relay:
        srv = await start_mta(relayhost=f"[127.0.0.1]:{relay.port}", mynetworks="127.0.0.1/32",
                              smtpd_recipient_restrictions="check_recipient_access "
                              "inline:{ { r@remote.example=BCC archive@remote.example } }, permit_mynetworks")
        await send(srv, "a@client.example", ["r@remote.example"])
        await wait_empty(srv)
        assert sorted(relay.recorder.recipients()) == ["archive@remote.example", "r@remote.example"]


async def test_bcc_to_an_invalid_address_is_ignored(start_mta):
    with Sink() as relay:
        srv = await start_mta(relayhost=f"[127.0.0.1]:{relay.port}", mynetworks="127.0.0.1/32",
                              smtpd_recipient_restrictions="check_recipient_access "
                              "inline:{ { r@remote.example=BCC @@ } }, permit_mynetworks")
        await send(srv, "a@client.example", ["r@remote.example"])
        await wait_empty(srv)
        assert relay.recorder.recipients() == ["r@remote.example"]
