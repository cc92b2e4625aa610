"""Delivery end to end: a real serve, real SMTP peers on loopback, a real DNS server."""

from __future__ import annotations

import email
import email.policy
import logging
import smtplib
import time

import pytest
import trio

from tests.conftest import trimail, wait_for, write_main_cf
from tests.peers import DroppingServer, Sink, greeting_only_server, silent_server
from tests.ports import free_port
from trimail.queue.store import Store


def submit(port: int, sender: str, recipients: list[str], body: str = "Subject: test\r\n\r\nhello\r\n") -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.example")
        client.mail(sender)
        for rcpt in recipients:
            assert client.rcpt(rcpt)[0] == 250
        code, reply = client.data(body)
        assert code == 250
        return reply.decode().rsplit(" ", 1)[1]


async def send(server, sender: str, recipients: list[str], body: str = "Subject: test\r\n\r\nhello\r\n") -> str:
    return await trio.to_thread.run_sync(submit, server.addresses[0].port, sender, recipients, body)


def queue(server) -> list:
    store = Store.open(server.config.queue_directory, readonly=True)
    try:
        return store.list_messages()
    finally:
        store.close()


async def wait_empty(server, timeout: float = 20) -> None:
    await wait_for(lambda: not queue(server), timeout)


def recipient_status(server, queue_id: str) -> dict[str, tuple[str, str | None]]:
    for message in queue(server):
        if message.id == queue_id:
            return {r.address: (r.status, r.last_reply) for r in message.recipients}
    return {}


async def test_relay_through_relayhost(start_mta):
    with Sink() as sink:
        srv = await start_mta(relayhost=f"[127.0.0.1]:{sink.port}")
        await send(srv, "alice@client.example", ["bob@far.example", "carol@other.example"])
        await wait_empty(srv)
        [(sender, rcpts, content)] = sink.messages
        assert sender == "alice@client.example"
        assert sorted(rcpts) == ["bob@far.example", "carol@other.example"]
        assert b"Received: from client.example" in content and content.endswith(b"hello\r\n")


async def test_routing_by_transport_maps(start_mta):
    with Sink() as one, Sink() as two:
        srv = await start_mta(transport_maps=f"inline:{{ one.example=smtp:[127.0.0.1]:{one.port}, "
                                             f".two.example=relay:[127.0.0.1]:{two.port} }}")
        await send(srv, "a@client.example", ["x@one.example", "y@sub.two.example"])
        await wait_empty(srv)
        assert one.recorder.recipients() == ["x@one.example"]
        assert two.recorder.recipients() == ["y@sub.two.example"]


async def test_mx_preference_and_fallback_to_next_mx(start_mta):
    zone = {"dest.example": {"MX": ["10 mx1.dest.example.", "20 mx2.dest.example."]},
            "mx1.dest.example": {"A": ["127.0.0.2"]},  # nothing listens there: refused
            "mx2.dest.example": {"A": ["127.0.0.3"]}}
    with Sink("127.0.0.3", 25) as sink:
        srv = await start_mta(zone)
        await send(srv, "a@client.example", ["rcpt@dest.example"])
        await wait_empty(srv)
        assert sink.recorder.recipients() == ["rcpt@dest.example"]


async def test_domain_without_mx_falls_back_to_its_address(start_mta):
    zone = {"plain.example": {"A": ["127.0.0.4"]}}
    with Sink("127.0.0.4", 25) as sink:
        srv = await start_mta(zone)
        await send(srv, "a@client.example", ["rcpt@plain.example"])
        await wait_empty(srv)
        assert sink.recorder.recipients() == ["rcpt@plain.example"]


def parse_dsn(content: bytes):
    message = email.message_from_bytes(content, policy=email.policy.default)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    parts = list(message.iter_parts())
    status = parts[1]
    assert status.get_content_type() == "message/delivery-status"
    per_recipient = status.get_payload()[1:]
    return message, [(r["Final-Recipient"], r["Action"], r["Status"]) for r in per_recipient], parts[2]


@pytest.mark.parametrize("zone, status", [
    ({"nullmx.example": {"MX": ["0 ."]}}, "5.1.10"),
    ({}, "5.1.2"),  # NXDOMAIN
], ids=["null-mx", "nxdomain"])
async def test_null_mx_and_nxdomain_bounce_to_the_sender(start_mta, zone, status):
    domain = next(iter(zone), "gone.example")
    with Sink() as senders:
        srv = await start_mta(zone, transport_maps=f"inline:{{ client.example=smtp:[127.0.0.1]:{senders.port} }}")
        await send(srv, "alice@client.example", [f"rcpt@{domain}"], "Subject: doomed\r\n\r\nx\r\n")
        await wait_empty(srv)
        [(sender, rcpts, content)] = senders.messages
        assert sender == "<>" and rcpts == ["alice@client.example"]  # aiosmtpd shows the null sender as <>
        message, recipients, headers = parse_dsn(content)
        assert message["From"] == "Mail Delivery System <MAILER-DAEMON@mx.test.example>"  # as Postfix 3.7
        assert recipients == [(f"rfc822; rcpt@{domain}", "failed", status)]
        assert headers.get_content_type() == "message/rfc822"  # the whole message, under bounce_size_limit
        assert headers.get_payload()[0]["Subject"] == "doomed"


async def test_servfail_defers(start_mta):
    srv = await start_mta({"sick.example": "SERVFAIL"})
    queue_id = await send(srv, "alice@client.example", ["rcpt@sick.example"])
    await wait_for(lambda: recipient_status(srv, queue_id).get("rcpt@sick.example", ("",))[0] == "deferred")
    status, reply = recipient_status(srv, queue_id)["rcpt@sick.example"]
    assert reply.startswith("4.4.3 ")
    [message] = queue(srv)
    assert message.state == "deferred"


async def test_mixed_recipient_results_in_one_transaction(start_mta):
    rules = {"bad": "550 5.1.1 <bad@dest.example>: user unknown", "later": "450 4.2.1 mailbox busy"}
    with Sink(rules=rules) as sink, Sink() as senders:
        srv = await start_mta(transport_maps=f"inline:{{ dest.example=smtp:[127.0.0.1]:{sink.port}, "
                                             f"client.example=smtp:[127.0.0.1]:{senders.port} }}")
        queue_id = await send(srv, "alice@client.example", ["good@dest.example", "bad@dest.example",
                                                             "later@dest.example"])
        await wait_for(lambda: len(senders.messages) == 1)
        assert sink.recorder.recipients() == ["good@dest.example"]
        statuses = recipient_status(srv, queue_id)
        assert statuses["later@dest.example"][0] == "deferred"
        assert statuses["later@dest.example"][1].startswith("4.2.1 ")
        assert "good@dest.example" not in {a for a, (s, _) in statuses.items() if s != "sent"}
        _, recipients, _ = parse_dsn(senders.messages[0][2])
        assert recipients == [("rfc822; bad@dest.example", "failed", "5.1.1")]


async def test_a_252_to_rcpt_is_not_a_delivery(start_mta):
    """Only 250/251 to RCPT and 2xx after the final dot deliver: a 252 (or any other
    success-looking reply where none belongs) defers the recipient; it is never
    marked sent without its message being transferred."""
    rules = {"odd": "252 2.1.5 Cannot VRFY user, but will accept message"}
    with Sink(rules=rules) as sink, Sink() as senders:
        srv = await start_mta(transport_maps=f"inline:{{ dest.example=smtp:[127.0.0.1]:{sink.port}, "
                                             f"client.example=smtp:[127.0.0.1]:{senders.port} }}")
        queue_id = await send(srv, "alice@client.example", ["good@dest.example", "odd@dest.example"])
        await wait_for(lambda: recipient_status(srv, queue_id).get("odd@dest.example", ("",))[0] == "deferred")
        assert sink.recorder.recipients() == ["good@dest.example"]
        status, reply = recipient_status(srv, queue_id)["odd@dest.example"]
        assert reply.startswith("4.5.0 ") and "252" in reply


async def test_a_peer_reply_with_terminal_escapes_is_stored_and_logged_printable(start_mta, nursery, caplog):
    """A downstream's words reach `queue list`, the log and bounces: never raw (an
    escape sequence retitles the operator's terminal, a CR forges a log line)."""
    caplog.set_level(logging.INFO, logger="trimail")
    port = await nursery.start(greeting_only_server,
                               b"421 4.3.2 busy \x1b]0;pwned\x07\x1b[2K\rFAKE OK status=sent\r\n")
    srv = await start_mta(relayhost=f"[127.0.0.1]:{port}")
    queue_id = await send(srv, "a@client.example", ["r@far.example"])
    await wait_for(lambda: recipient_status(srv, queue_id).get("r@far.example", ("",))[0] == "deferred")
    reply = recipient_status(srv, queue_id)["r@far.example"][1]
    assert "busy" in reply and "FAKE OK" in reply
    assert not any(ch in reply for ch in "\x1b\x07\r\n")
    logged = [r.getMessage() for r in caplog.records if "r@far.example" in r.getMessage()]
    assert logged and not any(ch in line for line in logged for ch in "\x1b\x07\r")


async def test_421_greeting_defers(start_mta, nursery):
    port = await nursery.start(greeting_only_server, b"421 4.3.2 busy, come back later\r\n")
    srv = await start_mta(relayhost=f"[127.0.0.1]:{port}")
    queue_id = await send(srv, "a@client.example", ["r@far.example"])
    await wait_for(lambda: recipient_status(srv, queue_id).get("r@far.example", ("",))[0] == "deferred")
    assert "refused to talk to me: 421" in recipient_status(srv, queue_id)["r@far.example"][1]


async def test_connection_dropped_in_data_defers_then_delivers_once(start_mta, nursery, tmp_path):
    peer = DroppingServer()
    port = await nursery.start(peer.run)
    srv = await start_mta(relayhost=f"[127.0.0.1]:{port}")
    queue_id = await send(srv, "a@client.example", ["r@far.example"])
    await wait_for(lambda: recipient_status(srv, queue_id).get("r@far.example", ("",))[0] == "deferred")
    assert "lost connection" in recipient_status(srv, queue_id)["r@far.example"][1]
    peer.drop = False
    result = await trio.to_thread.run_sync(lambda: trimail("queue", "flush", "-c", srv.config.source))
    assert result.returncode == 0, result.stderr
    await wait_empty(srv)
    assert peer.delivered == [["r@far.example"]]


async def test_backoff_grows_between_attempts(start_mta):
    srv = await start_mta({"sick.example": "SERVFAIL"}, minimal_backoff_time="100s", maximal_backoff_time="1000s")
    queue_id = await send(srv, "a@client.example", ["r@sick.example"])
    gaps = []
    for attempt in range(1, 4):
        await wait_for(lambda: any(r.attempts == attempt for m in queue(srv) for r in m.recipients))
        [message] = queue(srv)
        gaps.append(message.recipients[0].next_attempt - time.time())
        json_out = await trio.to_thread.run_sync(lambda: trimail("queue", "list", "--json", "-c", srv.config.source))
        assert f'"attempts": {attempt}' in json_out.stdout
        await trio.to_thread.run_sync(lambda: trimail("queue", "flush", queue_id, "-c", srv.config.source))
    assert 80 < gaps[0] < 115 and 170 < gaps[1] < 225 and 350 < gaps[2] < 445


async def test_queue_lifetime_expiry_bounces_with_the_last_reason(start_mta):
    with Sink() as senders:
        srv = await start_mta({"sick.example": "SERVFAIL"}, maximal_queue_lifetime="0s",
                              transport_maps=f"inline:{{ client.example=smtp:[127.0.0.1]:{senders.port} }}")
        await send(srv, "alice@client.example", ["r@sick.example"])
        await wait_empty(srv)
        _, recipients, _ = parse_dsn(senders.messages[0][2])
        assert recipients == [("rfc822; r@sick.example", "failed", "4.4.3")]


async def test_no_bounce_for_the_null_sender(start_mta):
    srv = await start_mta({})
    await send(srv, "<>", ["r@gone.example"])
    await wait_empty(srv)  # bounced recipient, and no notification queued


async def test_dead_destination_does_not_hold_up_live_ones(start_mta, nursery):
    hang = trio.Event()

    async def silent(*, task_status=trio.TASK_STATUS_IGNORED):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])

        async def handle(stream):
            await hang.wait()  # accepts, never greets

        await trio.serve_listeners(handle, listeners)

    dead_port = await nursery.start(silent)
    with Sink() as live:
        srv = await start_mta(smtp_helo_timeout="60s",
                              transport_maps=f"inline:{{ dead.example=smtp:[127.0.0.1]:{dead_port}, "
                                             f"live.example=smtp:[127.0.0.1]:{live.port} }}")
        for i in range(5):
            await send(srv, "a@client.example", [f"d{i}@dead.example"])
        for i in range(5):
            await send(srv, "a@client.example", [f"l{i}@live.example"])
        await wait_for(lambda: len(live.recorder.recipients()) == 5, timeout=10)
    hang.set()


async def test_mail_looping_back_to_myself_bounces(start_mta):
    own_port = free_port()
    zone = {"loop.example": {"MX": ["10 me.loop.example."]}, "me.loop.example": {"A": ["127.0.0.1"]}}
    with Sink() as senders:
        srv = await start_mta(zone, smtpd_listen=f"127.0.0.1:{own_port}",
                              transport_maps=f"inline:{{ client.example=smtp:[127.0.0.1]:{senders.port}, "
                                             f"loop.example=smtp:loop.example:{own_port} }}")
        await send(srv, "alice@client.example", ["r@loop.example"])
        await wait_empty(srv)
        message, recipients, _ = parse_dsn(senders.messages[0][2])
        assert recipients == [("rfc822; r@loop.example", "failed", "5.4.6")]
        assert "mail for loop.example loops back to myself" in message.as_string()


async def test_one_connection_carries_several_messages_to_a_destination(start_mta, nursery):
    peer = DroppingServer()
    port = await nursery.start(peer.run)
    srv = await start_mta(relayhost=f"[127.0.0.1]:{port}", smtp_destination_concurrency_limit=1)
    for i in range(5):
        await send(srv, "a@client.example", [f"r{i}@far.example"])
    await wait_for(lambda: len(queue(srv)) == 5 and all(m.state == "deferred" for m in queue(srv)))
    peer.drop = False
    before = peer.connections
    await trio.to_thread.run_sync(lambda: trimail("queue", "flush", "-c", srv.config.source))
    await wait_empty(srv)
    assert sorted(r for rcpts in peer.delivered for r in rcpts) == [f"r{i}@far.example" for i in range(5)]
    assert peer.connections == before + 1


@pytest.mark.parametrize("cache_time, connections", [("3s", 1), ("0s", 2)])
async def test_an_idle_connection_waits_for_the_next_message_then_closes(start_mta, nursery, cache_time,
                                                                         connections):
    """smtp_connection_cache_time_limit: after its last message a connection stays open
    that long for the next one to the same destination, then says QUIT."""
    peer = DroppingServer(drop=False)
    port = await nursery.start(peer.run)
    srv = await start_mta(relayhost=f"[127.0.0.1]:{port}", smtp_connection_cache_time_limit=cache_time)
    await send(srv, "a@client.example", ["r1@far.example"])
    await wait_empty(srv)
    if connections == 1:
        assert peer.open_now == 1  # delivered, and still connected
    await send(srv, "a@client.example", ["r2@far.example"])
    await wait_empty(srv)
    assert peer.delivered == [["r1@far.example"], ["r2@far.example"]]
    assert peer.connections == connections
    await wait_for(lambda: peer.open_now == 0, timeout=10)


async def test_new_mail_goes_straight_to_active_while_the_scheduler_has_room(start_mta):
    """Hand-over at acceptance: with room, the message is committed into active (no
    claim round); past qmgr_message_active_limit new mail waits in incoming for a
    round.  Either way its qmgr line ``from=<...> (queue active)`` is logged once, when
    it enters active, as Postfix's qmgr logs it (never also at acceptance)."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    qmgr_log = logging.getLogger("trimail.qmgr")
    level = qmgr_log.level
    qmgr_log.addHandler(handler)
    qmgr_log.setLevel(logging.INFO)
    try:
        with Sink(delay=1.5) as sink:  # a slow peer keeps the first messages in delivery
            srv = await start_mta(relayhost=f"[127.0.0.1]:{sink.port}", qmgr_message_active_limit=2)
            ids = [await send(srv, "a@client.example", [f"r{i}@far.example"]) for i in range(4)]
            await wait_empty(srv)
    finally:
        qmgr_log.removeHandler(handler)
        qmgr_log.setLevel(level)
    queued = [line.rsplit("(queue ", 1)[1].rstrip(")") for i in ids for line in lines
              if line.startswith(f"{i}: from=<a@client.example>")]
    assert queued == ["active"] * 4
    assert sorted(sink.recorder.recipients()) == [f"r{i}@far.example" for i in range(4)]


@pytest.mark.parametrize("limit", [1, 3])
async def test_a_busy_connection_does_not_hold_up_the_next_message(start_mta, limit):
    """While a worker is busy with a slow delivery, the next message for the same
    destination gets a worker (and connection) of its own, up to the concurrency limit."""
    with Sink(delay=1.5) as sink:
        srv = await start_mta(relayhost=f"[127.0.0.1]:{sink.port}", smtp_destination_concurrency_limit=limit)
        for i in range(3):
            await send(srv, "a@client.example", [f"r{i}@far.example"])
        await wait_empty(srv)
    assert sink.recorder.most_in_flight == limit
    assert sorted(sink.recorder.recipients()) == ["r0@far.example", "r1@far.example", "r2@far.example"]


async def test_content_held_in_memory_is_bounded_and_given_back(start_mta, monkeypatch):
    """Handed-over content is held only within HELD_TOTAL_LIMIT; past it the content
    is read from the queue.  Either way the peer gets the same bytes, and when the
    queue is empty nothing is held any more."""
    import trimail.scheduler.qmgr

    monkeypatch.setattr(trimail.scheduler.qmgr, "HELD_TOTAL_LIMIT", 3000)
    with Sink(delay=1.5) as sink:  # every message is still in delivery when the last is sent
        srv = await start_mta(relayhost=f"[127.0.0.1]:{sink.port}",
                              local_header_rewrite_clients="")  # bytes as sent: nothing added (remote client)
        bodies = [f"Subject: held {i}\r\n\r\n".encode() + (bytes([65 + i]) * 98 + b"\r\n") * 10 for i in range(4)]
        held = []
        for i, body in enumerate(bodies):
            await send(srv, "a@client.example", [f"r{i}@far.example"], body.decode())
            held.append(srv.scheduler._held)
        assert max(held) <= 3000 and held[-1] == held[-2]  # the last ones are read from the queue
        await wait_empty(srv)
        # the row goes at the completion commit; the memory is given back when the
        # scheduler's task resumes after it, which a poll of the queue can precede
        await wait_for(lambda: srv.scheduler._held == 0, 10)
    by_recipient = {rcpts[0]: content for _, rcpts, content in sink.messages}
    for i, body in enumerate(bodies):
        assert by_recipient[f"r{i}@far.example"].endswith(body)


def test_kill_9_during_a_delivery_burst_loses_no_recipient(tmp_path, serve_process):
    with Sink(delay=0.05) as sink:
        config_path = write_main_cf(tmp_path, master_service_disable="", relayhost=f"[127.0.0.1]:{sink.port}",
                                    smtp_destination_concurrency_limit=2)
        proc = serve_process(config_path)
        accepted = []
        with smtplib.SMTP("127.0.0.1", proc.port, timeout=30) as client:
            for i in range(60):
                rcpts = [f"m{i}r{j}@far.example" for j in range(2)]
                client.sendmail("a@client.example", rcpts, f"Subject: burst {i}\r\n\r\nx\r\n")
                accepted += rcpts
        deadline = time.monotonic() + 30
        while len(sink.recorder.recipients()) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.proc.kill()
        proc.proc.wait(30)
        assert len(set(sink.recorder.recipients())) < len(accepted), "the burst ended before the kill"
        again = serve_process(config_path)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            store = Store.open(tmp_path / "queue", readonly=True)
            left = store.list_messages()
            store.close()
            if not left:
                break
            time.sleep(0.05)
        assert set(sink.recorder.recipients()) == set(accepted)
        assert again.stop() == 0


async def test_message_over_the_servers_size_limit_bounces_without_sending(start_mta):
    with Sink(size_limit=100) as sink, Sink() as senders:
        srv = await start_mta(transport_maps=f"inline:{{ dest.example=smtp:[127.0.0.1]:{sink.port}, "
                                             f"client.example=smtp:[127.0.0.1]:{senders.port} }}")
        await send(srv, "alice@client.example", ["r@dest.example"], "Subject: big\r\n\r\n" + "x" * 500 + "\r\n")
        await wait_empty(srv)
        assert sink.messages == []
        _, recipients, _ = parse_dsn(senders.messages[0][2])
        assert recipients == [("rfc822; r@dest.example", "failed", "5.3.4")]


async def test_helo_fallback_when_ehlo_is_refused(start_mta, nursery):
    peer = DroppingServer(drop=False, ehlo=False)
    port = await nursery.start(peer.run)
    srv = await start_mta(relayhost=f"[127.0.0.1]:{port}")
    await send(srv, "a@client.example", ["r@far.example"])
    await wait_empty(srv)
    assert peer.helo_seen == [b"HELO"] and peer.delivered == [["r@far.example"]]


async def test_silent_server_times_out_at_the_greeting(start_mta, nursery):
    port = await nursery.start(silent_server)
    srv = await start_mta(relayhost=f"[127.0.0.1]:{port}", smtp_helo_timeout="1s")
    queue_id = await send(srv, "a@client.example", ["r@far.example"])
    await wait_for(lambda: recipient_status(srv, queue_id).get("r@far.example", ("",))[0] == "deferred")
    assert "timed out while receiving the initial server greeting" in recipient_status(srv, queue_id)["r@far.example"][1]


async def test_delay_warning_is_sent_once(start_mta):
    with Sink() as senders:
        srv = await start_mta({"sick.example": "SERVFAIL"}, delay_warning_time="0.001s",
                              transport_maps=f"inline:{{ client.example=smtp:[127.0.0.1]:{senders.port} }}")
        queue_id = await send(srv, "alice@client.example", ["r@sick.example"])
        await wait_for(lambda: len(senders.messages) == 1)
        message, recipients, _ = parse_dsn(senders.messages[0][2])
        assert message["Subject"] == "Delayed Mail (still being retried)"
        assert recipients == [("rfc822; r@sick.example", "delayed", "4.4.3")]
        await trio.to_thread.run_sync(lambda: trimail("queue", "flush", "-c", srv.config.source))
        await wait_for(lambda: any(r.attempts == 2 for m in queue(srv) for r in m.recipients))
        await wait_for(lambda: srv.scheduler.idle.is_set())
        assert len(senders.messages) == 1
        assert [m.id for m in queue(srv)] == [queue_id]


async def test_relay_to_an_embedded_trimail_peer(start_mta):
    """Dogfood: trimail.testing as the downstream server, next to the aiosmtpd peers."""
    from trimail.testing import open_test_mta

    async with open_test_mta() as downstream:
        downstream.reject(rcpt="nobody@*", code=550, text="No such user")
        srv = await start_mta(relayhost=f"[127.0.0.1]:{downstream.port}")
        queue_id = await send(srv, "a@client.example", ["ann@far.example", "nobody@far.example"])
        [arrived] = await downstream.wait_for(timeout=10, sender="a@client.example")
        assert arrived.recipients == ["ann@far.example"] and queue_id.encode() in arrived.raw
        # the refused recipient is bounced to the sender, through the same relayhost
        [bounce] = await downstream.wait_for(timeout=10, sender="", to="a@client.example")
        assert b"Final-Recipient: rfc822; nobody@far.example" in bounce.raw
        assert b"Status: 5.1.1" in bounce.raw and b"said: 550 5.1.1 No such user" in bounce.raw
        await wait_empty(srv)


def test_50_mib_message_is_relayed_with_bounded_memory(tmp_path, serve_process):
    from pathlib import Path

    size = 50 * 1024 * 1024
    line = b"0123456789" * 7 + b"\r\n"
    body = b"Subject: big\r\n\r\n" + line * (size // len(line))
    with Sink(size_limit=64 * 1024 * 1024) as sink:
        config_path = write_main_cf(tmp_path, master_service_disable="", message_size_limit=str(60 * 1024 * 1024),
                                    relayhost=f"[127.0.0.1]:{sink.port}")
        proc = serve_process(config_path)
        baseline = _peak_rss_kib(proc.proc.pid)
        with smtplib.SMTP("127.0.0.1", proc.port, timeout=120) as client:
            client.sendmail("a@client.example", ["r@far.example"], body)
        proc.wait_log(r"to=<r@far.example>, .*status=sent", timeout=120)
        peak = _peak_rss_kib(proc.proc.pid)
        [(_, _, content)] = sink.messages
        assert len(content) > size and content.endswith(line)
        # the spool, the blob writes and the delivery all stream: far less than the message
        assert peak - baseline < 20 * 1024, (baseline, peak)
        assert proc.stop() == 0
    assert Path(tmp_path / "queue" / "queue.db").exists()


def _peak_rss_kib(pid: int) -> int:
    from pathlib import Path

    for entry in Path(f"/proc/{pid}/status").read_text().splitlines():
        if entry.startswith("VmHWM:"):
            return int(entry.split()[1])
    raise AssertionError("no VmHWM")


async def test_flush_by_domain_delivers_that_sites_mail_and_leaves_the_rest_waiting(start_mta, nursery):
    """`trimail queue flush -d SITE` (Postfix's postqueue -s): when a site comes back,
    its deferred mail goes out at once; other sites' mail keeps its retry time."""
    peer = DroppingServer()
    port = await nursery.start(peer.run)
    srv = await start_mta(transport_maps=f"inline:{{ back.example=smtp:[127.0.0.1]:{port}, "
                                         f"other.example=smtp:[127.0.0.1]:{port} }}",
                          minimal_backoff_time="1000s", maximal_backoff_time="4000s")
    back = await send(srv, "a@client.example", ["r@BACK.example"])
    other = await send(srv, "a@client.example", ["r@other.example"])
    for queue_id, rcpt in ((back, "r@BACK.example"), (other, "r@other.example")):
        await wait_for(lambda q=queue_id, r=rcpt: recipient_status(srv, q).get(r, ("",))[0] == "deferred")
    peer.drop = False
    bad = await trio.to_thread.run_sync(lambda: trimail("queue", "flush", "-d", "a..b", "-c", srv.config.source))
    assert bad.returncode != 0 and "not a domain" in bad.stderr
    result = await trio.to_thread.run_sync(lambda: trimail("queue", "flush", "-d", "back.example.",
                                                           "-c", srv.config.source))
    assert result.returncode == 0 and "flushed 1 message(s) for back.example" in result.stderr, result.stderr
    await wait_for(lambda: [m.id for m in queue(srv)] == [other])
    assert peer.delivered == [["r@BACK.example"]]
    [waiting] = queue(srv)
    assert waiting.recipients[0].next_attempt > time.time() + 500  # untouched


def etrn_dialogue(port: int, commands: list[str]) -> tuple[str, list[tuple[int, str]]]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        _code, text = client.ehlo("client.example")
        answers = [client.docmd(command) for command in commands]
        return text.decode(), [(c, t.decode()) for c, t in answers]


async def test_etrn_flushes_an_eligible_site_and_refuses_others(start_mta, nursery):
    """ETRN (RFC 1985, Postfix's flush(8)): a client may have the deferred mail for a
    site in fast_flush_domains sent at once; other sites get 459; the syntax and the
    sequence rules are Postfix's."""
    peer = DroppingServer()
    port = await nursery.start(peer.run)
    srv = await start_mta(transport_maps=f"inline:{{ back.example=smtp:[127.0.0.1]:{port}, "
                                         f"other.example=smtp:[127.0.0.1]:{port} }}",
                          fast_flush_domains="back.example",
                          minimal_backoff_time="1000s", maximal_backoff_time="4000s")
    back = await send(srv, "a@client.example", ["r@back.example"])
    other = await send(srv, "a@client.example", ["r@other.example"])
    for queue_id, rcpt in ((back, "r@back.example"), (other, "r@other.example")):
        await wait_for(lambda q=queue_id, r=rcpt: recipient_status(srv, q).get(r, ("",))[0] == "deferred")
    peer.drop = False
    ehlo, answers = await trio.to_thread.run_sync(etrn_dialogue, srv.addresses[0].port, [
        "ETRN", "ETRN a..b", "ETRN other.example", "MAIL FROM:<a@client.example>", "ETRN back.example", "RSET",
        "ETRN @BACK.example"])
    assert "ETRN" in ehlo.split("\n")
    assert [code for code, _ in answers] == [500, 501, 459, 250, 503, 250, 250], answers
    assert answers[2][1] == "<other.example>: service unavailable"  # no enhanced code: Postfix
    assert answers[6][1] == "Queuing started"
    await wait_for(lambda: [m.id for m in queue(srv)] == [other])
    assert peer.delivered == [["r@back.example"]]


async def test_etrn_restrictions_refuse_before_the_site_is_looked_at(start_mta, nursery):
    """smtpd_etrn_restrictions (Postfix's smtpd_check_etrn): check_etrn_access sees
    the site and its parents; a refused ETRN flushes nothing; the client list runs
    too when it applies (permit_mynetworks lets the loopback client through)."""
    peer = DroppingServer()
    port = await nursery.start(peer.run)
    srv = await start_mta(transport_maps=f"inline:{{ .example=smtp:[127.0.0.1]:{port} }}",
                          fast_flush_domains="back.example, far.example",
                          smtpd_etrn_restrictions="check_etrn_access inline:{ far.example=REJECT }, "
                                                  "check_etrn_access inline:{ .sub.back.example=OK }, permit",
                          minimal_backoff_time="1000s", maximal_backoff_time="4000s")
    far = await send(srv, "a@client.example", ["r@far.example"])
    await wait_for(lambda: recipient_status(srv, far).get("r@far.example", ("",))[0] == "deferred")
    peer.drop = False
    _ehlo, answers = await trio.to_thread.run_sync(etrn_dialogue, srv.addresses[0].port, [
        "ETRN far.example", "ETRN back.example"])
    assert answers[0] == (554, "5.7.1 <far.example>: Etrn command rejected: Access denied"), answers
    assert answers[1] == (250, "Queuing started"), answers
    assert [m.id for m in queue(srv)] == [far] and peer.delivered == []


def test_etrn_restrictions_take_only_restrictions_that_fit(tmp_path):
    """check_etrn_access belongs in smtpd_etrn_restrictions only, and that list cannot
    look at a sender or recipient (there is no transaction at ETRN)."""
    from trimail.config import ConfigError, load
    from trimail.net.dns import Resolver
    from trimail.policy.restrictions import Policy

    for params, needle in (({"smtpd_recipient_restrictions": "check_etrn_access inline:{ a=OK }"},
                            "check_etrn_access"),
                           ({"smtpd_etrn_restrictions": "reject_unknown_sender_domain"},
                            "reject_unknown_sender_domain")):
        with pytest.raises(ConfigError, match=needle):
            Policy(load(write_main_cf(tmp_path, **params)), Resolver())


async def test_an_etrn_that_makes_nothing_due_does_not_forget_the_dead_sites(start_mta, nursery):
    """Postfix's flush(8) unthrottles the queue manager only for a site that has
    mail waiting: any client may send ETRN for a fast_flush_domains site, and one
    with nothing queued must not make every dead destination cost another round of
    connection timeouts."""
    from trimail.delivery.outcome import deferred

    srv = await start_mta(fast_flush_domains="back.example")
    dead = srv.scheduler.dead
    dead.mark(("smtp", "far.example", 25, True), "smtp:far.example", deferred("4.4.1", "connect: timed out"),
              time.time(), 300)
    _ehlo, answers = await trio.to_thread.run_sync(etrn_dialogue, srv.addresses[0].port, ["ETRN back.example"])
    assert answers == [(250, "Queuing started")]
    assert [site.destination for site in dead.snapshot(time.time())] == ["smtp:far.example"]


async def test_lines_past_smtp_line_length_limit_are_broken_for_the_next_hop(start_mta):
    """Postfix's smtp_line_length_limit (998): a longer header or body line goes out
    broken with CRLF SPACE.  aiosmtpd, like many servers, refuses a line past 1,000
    octets ("500 Line too long"): a milter's 900 KB header bounced so (red team 34)."""
    subject = "Subject: " + "word " * 600  # 3,009 octets
    body = "x" * 2500
    with Sink() as sink:
        srv = await start_mta(relayhost=f"[127.0.0.1]:{sink.port}")
        await send(srv, "a@client.example", ["b@far.example"], f"{subject}\r\n\r\n{body}\r\n")
        await wait_empty(srv)
    [(_, _, content)] = sink.messages
    assert max(len(line) for line in content.split(b"\r\n")) <= 998
    unbroken = content.replace(b"\r\n ", b"")
    assert subject.encode() in unbroken.split(b"\r\n") and unbroken.endswith(f"\r\n\r\n{body}\r\n".encode())
