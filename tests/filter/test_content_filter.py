"""The after-queue content filter end to end (issue 20, section 2): a gateway trimail
with ``content_filter = smtp:[127.0.46.2]:PORT`` and a ``reinject_listen`` listener,
a second real trimail as the filter that relays everything back to that listener
(adding its ``Received:`` header), and an aiosmtpd sink as the final destination.
Everything binds in 127.0.46.0/24."""

from __future__ import annotations

import email
import email.policy
import json

import trio

from tests.conftest import trimail, wait_for, write_main_cf
from tests.filter.mtas import FILTER, FINAL, GATEWAY, queue, send, start, start_filter, wait_empty
from tests.peers import Sink
from tests.ports import free_port
from trimail.queue.store import Store


def received_by(raw: bytes) -> list[str]:
    """The hosts named in each Received: header's "by" clause, newest first."""
    message = email.message_from_bytes(raw, policy=email.policy.compat32)
    return [" ".join(str(value).split()).split(" by ", 1)[1].split(" ", 1)[0]
            for value in message.get_all("Received", [])]


def stored_params(server, queue_id: str) -> dict:
    store = Store.open(server.config.queue_directory, readonly=True)
    try:
        row = store.db.execute("SELECT params FROM message WHERE id = ?", (queue_id,)).fetchone()
        return json.loads(row[0])
    finally:
        store.close()


async def gateway(nursery, tmp_path, sink: Sink, filter_port: int, reinject_port: int, **params):
    settings = {"myhostname": "mx.test.example", "smtpd_listen": f"{GATEWAY}:0",
                "reinject_listen": f"{GATEWAY}:{reinject_port}", "relayhost": f"[{FINAL}]:{sink.port}",
                "content_filter": f"smtp:[{FILTER}]:{filter_port}"}
    settings.update(params)
    return await start(nursery, tmp_path / "gateway", **settings)


async def test_mail_goes_through_the_filter_and_reaches_its_destination_once(nursery, tmp_path):
    filter_port, reinject_port = free_port(FILTER), free_port(GATEWAY)
    with Sink(FINAL) as sink:
        gw = await gateway(nursery, tmp_path, sink, filter_port, reinject_port)
        flt = await start_filter(nursery, tmp_path / "filter", filter_port, reinject_port)
        await trio.to_thread.run_sync(send, GATEWAY, gw.addresses[0].port, "a@client.example",
                                      ["r@remote.example", "s@other.example"])
        await wait_for(lambda: len(sink.messages) >= 1, 30)
        await wait_empty(gw, flt)
        [(sender, recipients, raw)] = sink.messages  # exactly once: the reinjected copy is not filtered again
        assert sender == "a@client.example" and sorted(recipients) == ["r@remote.example", "s@other.example"]
        # newest first: the gateway's reinjection listener, the filter, the gateway's first receipt
        assert received_by(raw) == ["mx.test.example", "filter.test.example", "mx.test.example"]


async def test_a_filter_that_is_down_defers_and_delivers_through_it_when_it_is_back(nursery, tmp_path):
    filter_port, reinject_port = free_port(FILTER), free_port(GATEWAY)
    with Sink(FINAL) as sink:
        gw = await gateway(nursery, tmp_path, sink, filter_port, reinject_port)
        queue_id = await trio.to_thread.run_sync(send, GATEWAY, gw.addresses[0].port, "a@client.example",
                                                 ["r@remote.example"])

        def deferred() -> str | None:
            for message in queue(gw):
                for rcpt in message.recipients:
                    if message.id == queue_id and rcpt.status == "deferred":
                        return rcpt.last_reply
            return None

        await wait_for(lambda: deferred() is not None, 30)
        assert deferred().startswith("4.4.1 ") and FILTER in deferred()  # a 4.x.x, never a bypass
        assert [m.state for m in queue(gw)] == ["deferred"] and sink.messages == []
        # the filter is stored with the message: a reload without content_filter changes nothing for it
        assert stored_params(gw, queue_id)["_FILTER"] == f"smtp:[{FILTER}]:{filter_port}"
        main_cf = tmp_path / "gateway" / "main.cf"
        main_cf.write_text(main_cf.read_text().replace(f"content_filter = smtp:[{FILTER}]:{filter_port}\n", ""))
        assert await gw.reload() == "ok" and gw.config.content_filter == ""
        flush = await trio.to_thread.run_sync(lambda: trimail("queue", "flush", "-c", str(main_cf)))
        assert flush.returncode == 0, flush.stderr
        await wait_for(lambda: (m := queue(gw)) and m[0].recipients[0].attempts >= 2, 30)
        assert sink.messages == [] and deferred() is not None
        flt = await start_filter(nursery, tmp_path / "filter", filter_port, reinject_port)
        flush = await trio.to_thread.run_sync(lambda: trimail("queue", "flush", "-c", str(main_cf)))
        assert flush.returncode == 0, flush.stderr
        await wait_for(lambda: len(sink.messages) >= 1, 30)
        await wait_empty(gw, flt)
        [(_, recipients, raw)] = sink.messages
        assert recipients == ["r@remote.example"] and "filter.test.example" in received_by(raw)


async def test_access_filter_sends_only_the_matched_mail_to_the_filter(nursery, tmp_path):
    filter_port, reinject_port = free_port(FILTER), free_port(GATEWAY)
    with Sink(FINAL) as sink:
        access = f"inline:{{ {{ f@remote.example=FILTER smtp:[{FILTER}]:{filter_port} }} }}"
        gw = await gateway(nursery, tmp_path, sink, filter_port, reinject_port, content_filter="",
                           smtpd_recipient_restrictions=f"check_recipient_access {access}, permit_mynetworks")
        flt = await start_filter(nursery, tmp_path / "filter", filter_port, reinject_port)
        port = gw.addresses[0].port
        await trio.to_thread.run_sync(send, GATEWAY, port, "a@client.example", ["f@remote.example"])
        await trio.to_thread.run_sync(send, GATEWAY, port, "a@client.example", ["plain@remote.example"])
        await wait_for(lambda: len(sink.messages) >= 2, 30)
        await wait_empty(gw, flt)
        by_recipient = {tuple(recipients): received_by(raw) for _, recipients, raw in sink.messages}
        assert by_recipient == {("f@remote.example",): ["mx.test.example", "filter.test.example", "mx.test.example"],
                                ("plain@remote.example",): ["mx.test.example"]}


async def test_the_filter_set_up_works_with_smtpd_and_qmgr_worker_processes(nursery, tmp_path, serve_process):
    filter_port, reinject_port, port = free_port(FILTER), free_port(GATEWAY), free_port(GATEWAY)
    with Sink(FINAL) as sink:
        flt = await start_filter(nursery, tmp_path / "filter", filter_port, reinject_port)
        directory = tmp_path / "gateway"
        directory.mkdir()
        path = write_main_cf(directory, myhostname="mx.test.example", smtpd_listen=f"{GATEWAY}:{port}",
                             reinject_listen=f"{GATEWAY}:{reinject_port}", relayhost=f"[{FINAL}]:{sink.port}",
                             content_filter=f"smtp:[{FILTER}]:{filter_port}", master_service_disable="",
                             smtpd_workers="1", mynetworks="127.0.0.0/8", mydestination="",
                             dns_nameservers="127.0.46.9:9")
        gw = await trio.to_thread.run_sync(serve_process, path)
        await trio.to_thread.run_sync(send, GATEWAY, port, "a@client.example", ["r@remote.example"])
        await wait_for(lambda: len(sink.messages) >= 1, 30)
        await wait_for(lambda: not queue(flt), 30)
        gw.stop()
        [(_, recipients, raw)] = sink.messages
        assert recipients == ["r@remote.example"]
        assert received_by(raw) == ["mx.test.example", "filter.test.example", "mx.test.example"]
