"""smtpd_milters end to end with a milter written in the test (tests/milter/peers.py
FakeMilter on 127.0.45.2): each reply at each stage, every modification action,
several milters in order, the macros, and what Postfix logs."""

from __future__ import annotations

import logging
import smtplib
import struct

import trio

from tests.conftest import wait_for
from tests.milter.conftest import MESSAGE, send, stored
from tests.milter.peers import FakeMilter, reply
from trimail.milter import protocol as p


def on(command: bytes, *frames: bytes):
    """A script answering *command* with *frames*, continue to everything else."""
    return lambda c, data, m: list(frames) if c == command else None


async def fake(nursery, script=None, **kw) -> FakeMilter:
    return await nursery.start(FakeMilter(script, **kw).run)


async def test_reject_at_rcpt_is_550_and_logged_as_postfix_logs_it(start_serve, nursery, caplog):
    caplog.set_level(logging.INFO)
    milter = await fake(nursery, on(p.SMFIC_RCPT, reply(p.SMFIR_REJECT)))
    srv = await start_serve(smtpd_milters=milter.name)
    result = await send(srv, "alice@example.com", ["bob@remote.example"])
    assert result.rcpts == [(550, b"5.7.1 Command rejected")]
    assert ("NOQUEUE: milter-reject: RCPT from unknown[127.0.0.1]: 550 5.7.1 Command rejected; "
            "from=<alice@example.com> to=<bob@remote.example> proto=ESMTP helo=<client.example>") in caplog.text


async def test_tempfail_at_mail_is_451(start_serve, nursery):
    milter = await fake(nursery, on(p.SMFIC_MAIL, reply(p.SMFIR_TEMPFAIL)))
    srv = await start_serve(smtpd_milters=milter.name)
    result = await send(srv, "alice@example.com", ["bob@remote.example"])
    assert result.mail == (451, b"4.7.1 Service unavailable - try again later")


async def test_custom_reply_code_at_end_of_data(start_serve, nursery, caplog):
    caplog.set_level(logging.INFO)
    milter = await fake(nursery, on(p.SMFIC_BODYEOB, reply(p.SMFIR_REPLYCODE, b"554 5.7.0 Virus found: 100%% bad\0")))
    srv = await start_serve(smtpd_milters=milter.name)
    result = await send(srv, "alice@example.com", ["bob@remote.example"])
    assert result.data == (554, b"5.7.0 Virus found: 100% bad")
    assert "milter-reject: END-OF-MESSAGE from unknown[127.0.0.1]: 554 5.7.0 Virus found: 100% bad;" in caplog.text


async def test_malformed_reply_code_is_a_configuration_problem(start_serve, nursery, caplog):
    milter = await fake(nursery, on(p.SMFIC_MAIL, reply(p.SMFIR_REPLYCODE, b"250 fine\0")))
    srv = await start_serve(smtpd_milters=milter.name)
    result = await send(srv, "alice@example.com", ["bob@remote.example"])
    assert result.mail == (451, b"4.3.5 Server configuration problem - try again later")
    assert f"milter {milter.name}: malformed reply: 250 fine" in caplog.text


async def test_discard_accepts_and_drops_the_message(start_serve, nursery, caplog):
    caplog.set_level(logging.INFO)
    milter = await fake(nursery, on(p.SMFIC_BODYEOB, reply(p.SMFIR_DISCARD)))
    srv = await start_serve(smtpd_milters=milter.name)
    result = await send(srv, "alice@example.com", ["bob@remote.example"])
    assert result.data is not None and result.data[0] == 250
    assert "milter-discard: END-OF-MESSAGE from unknown[127.0.0.1]: milter triggers DISCARD action;" in caplog.text
    store_ids = [m.id for m in _queue(srv)]
    assert result.queue_id not in store_ids


async def test_quarantine_holds_the_message(start_serve, nursery, caplog):
    caplog.set_level(logging.INFO)
    milter = await fake(nursery, on(p.SMFIC_BODYEOB, reply(p.SMFIR_QUARANTINE, b"looks odd\0"),
                                    reply(p.SMFIR_ACCEPT)))
    srv = await start_serve(smtpd_milters=milter.name)
    result = await send(srv, "alice@example.com", ["bob@remote.example"])
    info, _ = stored(srv, result.queue_id)
    assert info.state == "hold"
    assert "milter-hold: END-OF-MESSAGE from unknown[127.0.0.1]: looks odd;" in caplog.text


async def test_every_modification_action_is_made_before_the_commit(start_serve, nursery):
    edits = [
        reply(p.SMFIR_ADDHEADER, b"X-Added\0yes\0"),
        reply(p.SMFIR_CHGHEADER, struct.pack(">I", 1) + b"Subject\0changed subject\0"),
        reply(p.SMFIR_CHGHEADER, struct.pack(">I", 1) + b"Message-ID\0\0"),  # empty value: delete
        reply(p.SMFIR_INSHEADER, struct.pack(">I", 1) + b"X-Inserted\0below our Received\0"),
        reply(p.SMFIR_CHGFROM, b"<bounces@example.com>\0"),
        reply(p.SMFIR_ADDRCPT, b"<archive@remote.example>\0"),
        reply(p.SMFIR_DELRCPT, b"<carol@remote.example>\0"),
        reply(p.SMFIR_REPLBODY, b"New body line 1\r\n"),
        reply(p.SMFIR_REPLBODY, b"line 2\r\n"),
        reply(p.SMFIR_CONTINUE),
    ]
    milter = await fake(nursery, on(p.SMFIC_BODYEOB, *edits))
    srv = await start_serve(smtpd_milters=milter.name)
    result = await send(srv, "alice@example.com", ["bob@remote.example", "carol@remote.example"])
    info, content = stored(srv, result.queue_id)
    header, body = content.split(b"\r\n\r\n", 1)
    lines = header.split(b"\r\n")
    assert lines[0].startswith(b"Received: from client.example")
    assert b"X-Inserted: below our Received" in header
    assert header.index(b"X-Inserted") < header.index(b"From: Alice")
    assert b"Subject: changed subject" in header and b"milter test" not in header
    assert b"Message-ID" not in header
    assert header.endswith(b"X-Added: yes")
    assert body == b"New body line 1\r\nline 2\r\n"
    assert info.sender == "bounces@example.com"
    assert sorted(r.address for r in info.recipients) == ["archive@remote.example", "bob@remote.example"]
    # what the filter saw: headers without our Received:, one leading space eaten
    headers = [d.split(b"\0")[:2] for d in milter.got(p.SMFIC_HEADER)]
    assert headers[0] == [b"From", b"Alice <alice@example.com>"]
    assert all(name != b"Received" for name, _ in headers)
    assert b"".join(milter.got(p.SMFIC_BODY)) == b"Hello Bob,\r\nthis is the body.\r\n"


async def test_a_recipient_a_milter_adds_twice_is_queued_once(start_serve, nursery):
    # cleanup's duplicate filter sees what milters add too (tests/rewrite/test_duplicate_recipients.py)
    milter = await fake(nursery, on(p.SMFIC_BODYEOB, reply(p.SMFIR_ADDRCPT, b"<Bob@remote.example>\0"),
                                    reply(p.SMFIR_ADDRCPT, b"<archive@remote.example>\0"),
                                    reply(p.SMFIR_ADDRCPT, b"<archive@remote.example>\0"), reply(p.SMFIR_CONTINUE)))
    srv = await start_serve(smtpd_milters=milter.name)
    result = await send(srv, "alice@example.com", ["bob@remote.example"])
    info, _ = stored(srv, result.queue_id)
    assert [r.address for r in info.recipients] == ["bob@remote.example", "archive@remote.example"]


async def test_an_action_not_negotiated_is_a_protocol_error(start_serve, nursery, caplog):
    milter = await fake(nursery, on(p.SMFIC_BODYEOB, reply(p.SMFIR_ADDHEADER, b"X-A\0b\0"), reply(p.SMFIR_CONTINUE)),
                        actions=p.SMFIF_CHGHDRS)
    srv = await start_serve(smtpd_milters=milter.name)
    result = await send(srv, "alice@example.com", ["bob@remote.example"])
    assert result.data == (451, b"4.7.1 Service unavailable - try again later")
    assert "addheader was not negotiated" in caplog.text


async def test_connect_reject_is_the_greeting(start_serve, nursery, caplog):
    caplog.set_level(logging.INFO)
    milter = await fake(nursery, on(p.SMFIC_CONNECT, reply(p.SMFIR_REJECT)))
    srv = await start_serve(smtpd_milters=milter.name)

    def greet() -> tuple[int, bytes]:
        client = smtplib.SMTP()
        try:
            return client.connect("127.0.45.1", srv.addresses[0].port)
        finally:
            client.close()

    code, text = await trio.to_thread.run_sync(greet)
    assert (code, text) == (554, b"mx.test.example ESMTP not accepting connections")
    assert "NOQUEUE: milter-reject: CONNECT from unknown[127.0.0.1]: 550 5.7.1 Command rejected;" in caplog.text


async def test_a_helo_refusal_stays_the_filters_answer_to_mail(start_serve, nursery):
    milter = await fake(nursery, on(p.SMFIC_HELO, reply(p.SMFIR_REPLYCODE, b"550 5.7.1 No such HELO\0")))
    srv = await start_serve(smtpd_milters=milter.name)
    result = await send(srv, "alice@example.com", ["bob@remote.example"])
    assert result.mail == (550, b"5.7.1 No such HELO")  # HELO itself got 250 (Sendmail's rule)
    assert milter.got(p.SMFIC_MAIL) == []


async def test_accept_at_connect_means_no_more_events(start_serve, nursery):
    milter = await fake(nursery, on(p.SMFIC_CONNECT, reply(p.SMFIR_ACCEPT)))
    srv = await start_serve(smtpd_milters=milter.name)
    result = await send(srv, "alice@example.com", ["bob@remote.example"])
    assert result.data is not None and result.data[0] == 250
    await wait_for(lambda: milter.got(p.SMFIC_QUIT))
    commands = [c for c, _ in milter.commands if c != p.SMFIC_MACRO]
    assert commands == [p.SMFIC_OPTNEG, p.SMFIC_CONNECT, p.SMFIC_QUIT]  # QUIT when the session ends


async def test_milters_run_in_order_and_each_sees_the_last_ones_edits(start_serve, nursery):
    first = await fake(nursery, on(p.SMFIC_BODYEOB, reply(p.SMFIR_ADDHEADER, b"X-First\0one\0"),
                                   reply(p.SMFIR_CONTINUE)))
    second = await fake(nursery, on(p.SMFIC_BODYEOB, reply(p.SMFIR_ADDHEADER, b"X-Second\0two\0"),
                                    reply(p.SMFIR_CONTINUE)), host="127.0.45.3")
    srv = await start_serve(smtpd_milters=f"{first.name}, {second.name}")
    result = await send(srv, "alice@example.com", ["bob@remote.example"])
    _, content = stored(srv, result.queue_id)
    assert content.index(b"X-First: one") < content.index(b"X-Second: two")
    assert [b"X-First", b"one"] in [d.split(b"\0")[:2] for d in second.got(p.SMFIC_HEADER)]


async def test_a_reject_by_the_first_milter_is_not_shown_to_the_second(start_serve, nursery):
    first = await fake(nursery, on(p.SMFIC_RCPT, reply(p.SMFIR_REJECT)))
    second = await fake(nursery, None, host="127.0.45.3")
    srv = await start_serve(smtpd_milters=f"{first.name} {second.name}")
    result = await send(srv, "alice@example.com", ["bob@remote.example"])
    assert result.rcpts == [(550, b"5.7.1 Command rejected")]
    assert second.got(p.SMFIC_MAIL) and not second.got(p.SMFIC_RCPT)


async def test_macros_carry_postfix_names_and_values(start_serve, nursery):
    milter = await fake(nursery)
    srv = await start_serve(smtpd_milters=milter.name)
    result = await send(srv, "alice@example.com", ["bob@remote.example"])
    macros = milter.macros()
    assert macros["j"] == "mx.test.example"
    assert macros["{daemon_name}"] == "mx.test.example"
    assert macros["_"] == "unknown [127.0.0.1]"
    assert macros["{mail_addr}"] == "alice@example.com"
    assert macros["{rcpt_addr}"] == "bob@remote.example"
    assert macros["{rcpt_mailer}"] == "smtp" and macros["{rcpt_host}"] == "remote.example"
    assert macros["i"] == result.queue_id
    connect = milter.got(p.SMFIC_CONNECT)[0]
    assert connect == b"[127.0.0.1]\0" + b"4" + struct.pack(">H", 0) + b"127.0.0.1\0"


async def test_no_reply_and_no_body_flags_are_honoured(start_serve, nursery):
    milter = await fake(nursery, protocol=p.SMFIP_NR_HDR | p.SMFIP_NOBODY | p.SMFIP_NR_RCPT)
    srv = await start_serve(smtpd_milters=milter.name)
    result = await send(srv, "alice@example.com", ["bob@remote.example"])
    assert result.data is not None and result.data[0] == 250
    assert milter.got(p.SMFIC_HEADER) and not milter.got(p.SMFIC_BODY)


async def test_skip_stops_the_body_chunks(start_serve, nursery):
    milter = await fake(nursery, on(p.SMFIC_BODY, reply(p.SMFIR_SKIP)), protocol=p.SMFIP_SKIP)
    srv = await start_serve(smtpd_milters=milter.name)
    big = MESSAGE.replace("this is the body.", "x" * 200_000)
    result = await send(srv, "alice@example.com", ["bob@remote.example"], big)
    assert result.data is not None and result.data[0] == 250
    assert len(milter.got(p.SMFIC_BODY)) == 1 and milter.got(p.SMFIC_BODYEOB)


def _queue(srv):
    from trimail.queue.store import Store
    store = Store.open(srv.config.queue_directory, readonly=True)
    try:
        return store.list_messages()
    finally:
        store.close()


async def test_quarantine_at_rcpt_holds_that_message_only(start_serve, nursery, caplog):
    caplog.set_level(logging.INFO)
    milter = await fake(nursery, lambda c, d, m: [reply(p.SMFIR_QUARANTINE, b"rcpt says\0"), reply(p.SMFIR_CONTINUE)]
                        if c == p.SMFIC_RCPT and b"bob" in d else None)
    srv = await start_serve(smtpd_milters=milter.name)

    def two_messages() -> None:  # one SMTP session
        with smtplib.SMTP("127.0.45.1", srv.addresses[0].port, timeout=30) as client:
            for rcpt in ("bob@remote.example", "carol@remote.example"):
                client.sendmail("alice@example.com", [rcpt], MESSAGE)

    await trio.to_thread.run_sync(two_messages)
    states = {m.recipients[0].address: m.state for m in _queue(srv)}
    assert states == {"bob@remote.example": "hold", "carol@remote.example": "incoming"}
    assert "milter-hold: RCPT from unknown[127.0.0.1]: rcpt says;" in caplog.text


async def test_rset_aborts_the_filters_transaction(start_serve, nursery):
    milter = await fake(nursery)
    srv = await start_serve(smtpd_milters=milter.name)

    def rset() -> None:
        with smtplib.SMTP("127.0.45.1", srv.addresses[0].port, timeout=30) as client:
            client.ehlo("client.example")
            client.mail("alice@example.com")
            client.rset()
            client.mail("alice@example.com")

    await trio.to_thread.run_sync(rset)
    order = [c for c, _ in milter.commands if c in (p.SMFIC_MAIL, p.SMFIC_ABORT)]
    assert order == [p.SMFIC_MAIL, p.SMFIC_ABORT, p.SMFIC_MAIL]


async def test_a_multi_line_reply_from_a_filter(start_serve, nursery):
    text = b"550-5.7.1 first line\r\n550 5.7.1 second line\0"
    milter = await fake(nursery, on(p.SMFIC_RCPT, reply(p.SMFIR_REPLYCODE, text)))
    srv = await start_serve(smtpd_milters=milter.name)
    result = await send(srv, "alice@example.com", ["bob@remote.example"])
    assert result.rcpts == [(550, b"5.7.1 first line\n5.7.1 second line")]


async def test_a_unix_socket_filter(start_serve, nursery, tmp_path):
    path = tmp_path / "milter.sock"
    milter = await fake(nursery, on(p.SMFIC_BODYEOB, reply(p.SMFIR_ADDHEADER, b"X-Unix\0yes\0"),
                                    reply(p.SMFIR_CONTINUE)), unix=str(path))
    assert milter.name == f"unix:{path}"
    srv = await start_serve(smtpd_milters=milter.name)
    result = await send(srv, "alice@example.com", ["bob@remote.example"])
    _, content = stored(srv, result.queue_id)
    assert b"\r\nX-Unix: yes\r\n" in content


async def test_no_milters_in_receive_override_options_turns_smtpd_milters_off(start_serve, nursery):
    """Postfix's receive_override_options = no_milters (the content filter's reinjection
    listener has it by default): the listener neither connects to the milters nor asks them."""
    milter = await fake(nursery, on(p.SMFIC_RCPT, reply(p.SMFIR_REJECT)))  # as in the first test
    srv = await start_serve(smtpd_milters=milter.name, receive_override_options="no_milters")
    result = await send(srv, "alice@example.com", ["bob@remote.example"])
    assert result.data is not None and result.data[0] == 250
    assert milter.commands == []


async def test_a_milter_deletes_a_recipient_however_the_client_spelled_it(start_serve, nursery):
    # red team 35a: a milter deletes what it saw at RCPT; the queue stores the address
    # without the final dot, and the spelling the milter named was not found: kept
    seen = [b"<carol@remote.example.>\0", b'<"dave"@remote.example>\0']
    milter = await fake(nursery, on(p.SMFIC_BODYEOB, *(reply(p.SMFIR_DELRCPT, s) for s in seen),
                                    reply(p.SMFIR_CONTINUE)))
    srv = await start_serve(smtpd_milters=milter.name)
    result = await send(srv, "alice@example.com", ["bob@remote.example", "carol@remote.example.",
                                                   "dave@remote.example"])
    info, _ = stored(srv, result.queue_id)
    assert [r.address for r in info.recipients] == ["bob@remote.example"]


async def test_a_milter_deletes_an_unqualified_recipient_it_saw(start_serve, nursery):
    # red team 35a: RCPT TO:<erin> is stored as erin@$myorigin; the filter saw <erin>
    milter = await fake(nursery, on(p.SMFIC_BODYEOB, reply(p.SMFIR_DELRCPT, b"<erin>\0"), reply(p.SMFIR_CONTINUE)))
    srv = await start_serve(smtpd_milters=milter.name, local_recipient_maps="")
    result = await send(srv, "alice@example.com", ["bob@remote.example", "erin"])
    info, _ = stored(srv, result.queue_id)
    assert [r.address for r in info.recipients] == ["bob@remote.example"]


async def test_a_recipient_a_milter_adds_is_stored_as_smtpd_stores_a_rcpt(start_serve, nursery):
    # red team 35a's lead: SMFIR_ADDRCPT <archive> was queued as "archive", <Bob@remote.example.>
    # with its final dot (a strict next hop refuses it); Postfix's cleanup rewrites both
    milter = await fake(nursery, on(p.SMFIC_BODYEOB, reply(p.SMFIR_ADDRCPT, b"<archive>\0"),
                                    reply(p.SMFIR_ADDRCPT, b"<carol@remote.example.>\0"), reply(p.SMFIR_CONTINUE)))
    srv = await start_serve(smtpd_milters=milter.name, local_recipient_maps="")
    result = await send(srv, "alice@example.com", ["bob@remote.example"])
    info, _ = stored(srv, result.queue_id)
    myorigin = srv.config.myorigin
    assert [r.address for r in info.recipients] == ["bob@remote.example", f"archive@{myorigin}",
                                                    "carol@remote.example"]


async def test_a_header_checks_pass_keeps_the_message_from_the_milters(start_serve, nursery, tmp_path, caplog):
    # header_checks(5) PASS: no further header/body checks and no Milter inspection of
    # this message; the control message (no PASS) is refused by the same milter
    caplog.set_level(logging.INFO)
    (tmp_path / "hc").write_text("/^Subject: trusted/ PASS known sender\n/^X-Later:/ REJECT not after a pass\n")
    milter = await fake(nursery, on(p.SMFIC_BODYEOB, reply(p.SMFIR_REPLYCODE, b"554 5.7.0 milter says no\0")))
    srv = await start_serve(smtpd_milters=milter.name, header_checks=f"regexp:{tmp_path / 'hc'}")
    passed = await send(srv, "alice@example.com", ["bob@remote.example"],
                        MESSAGE.replace("Subject: milter test", "Subject: trusted\r\nX-Later: yes"))
    info, content = stored(srv, passed.queue_id)
    assert b"X-Later: yes" in content
    assert milter.got(p.SMFIC_BODYEOB) == []
    assert (f"{passed.queue_id}: pass: header Subject: trusted from unknown[127.0.0.1]; from=<alice@example.com> "
            "to=<bob@remote.example> proto=ESMTP helo=<client.example>: known sender") in caplog.text
    control = await send(srv, "alice@example.com", ["bob@remote.example"])
    assert control.data == (554, b"5.7.0 milter says no")
