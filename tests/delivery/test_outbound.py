"""What goes out on the wire: MX fan-out bounds, malformed MX names, mail loops
(issue 14, section 4).  A real serve, the real loopback DNS server, scripted peers."""

from __future__ import annotations

import logging
import os
import random
import socket

import pytest

from tests.conftest import wait_for
from tests.delivery.outbound_peer import ScriptedPeer
from tests.delivery.test_delivery import parse_dsn, queue, recipient_status, send, wait_empty
from tests.dnsserver import run_dns_server
from tests.ports import free_port
from trimail.config.values import ListenAddress
from trimail.net.dns import Resolver


async def deferred_once(srv, queue_id: str, address: str) -> str:
    await wait_for(lambda: recipient_status(srv, queue_id).get(address, ("",))[0] == "deferred", timeout=10)
    [message] = [m for m in queue(srv) if m.id == queue_id]
    [rcpt] = [r for r in message.recipients if r.address == address]
    assert rcpt.attempts == 1
    return rcpt.last_reply


# -- 1. MX fan-out --------------------------------------------------------------------


@pytest.mark.parametrize("params, expected", [({}, 5), ({"smtp_mx_address_limit": "2"}, 2)],
                         ids=["default-5", "limit-2"])
async def test_a_zone_with_300_mx_records_costs_at_most_smtp_mx_address_limit_connections(
        start_mta, nursery, params, expected):
    peer = ScriptedPeer(greeting=b"421 4.3.2 busy, come back later")
    port = await nursery.start(peer.run)
    zone: dict = {"fan.example": {"MX": [f"10 mx{i}.fan.example." for i in range(300)]}}
    zone.update({f"mx{i}.fan.example": {"A": ["127.0.0.1"]} for i in range(300)})
    srv = await start_mta(zone, transport_maps=f"inline:{{ fan.example=smtp:fan.example:{port} }}", **params)
    queue_id = await send(srv, "a@client.example", ["r@fan.example"])
    reply = await deferred_once(srv, queue_id, "r@fan.example")
    assert "refused to talk to me: 421" in reply
    assert peer.connections == expected


# -- 2. an MX name that is an IP address -------------------------------------------------


async def test_an_mx_name_that_is_an_ip_address_is_deferred_and_never_connected_to(start_mta, nursery):
    peer = ScriptedPeer()
    port = await nursery.start(peer.run)
    zone = {"numeric.example": {"MX": ["10 127.0.0.1."]}}
    srv = await start_mta(zone, transport_maps=f"inline:{{ numeric.example=smtp:numeric.example:{port} }}")
    queue_id = await send(srv, "a@client.example", ["r@numeric.example"])
    reply = await deferred_once(srv, queue_id, "r@numeric.example")
    assert reply.startswith("4.4.4 ") and "malformed MX" in reply and "127.0.0.1" in reply
    assert peer.connections == 0


async def test_mx_hosts_skip_a_numeric_exchange_and_keep_the_named_ones(nursery):
    zone = {"mixed.example": {"MX": ["5 192.0.2.7.", "10 mx.mixed.example.", "20 [192.0.2.8]."]}}
    port = await nursery.start(run_dns_server, zone)
    resolver = Resolver([ListenAddress("127.0.0.1", port)])
    hosts = await resolver.mx_hosts("mixed.example")
    assert [h.name for h in hosts] == ["mx.mixed.example"]


# -- 3. mail loops ----------------------------------------------------------------------


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("binding port 25 needs root")


async def start_on_port_25(nursery, peer: ScriptedPeer) -> str:
    """The peer on port 25 of a loopback address of its own (127.0.0.0/8 is all ours)."""
    for _ in range(20):
        host = f"127.{random.randint(100, 250)}.{random.randint(0, 255)}.{random.randint(1, 254)}"
        try:
            await nursery.start(peer.run, host, 25)
            return host
        except OSError:
            continue
    pytest.skip("no free loopback address for port 25")


async def test_a_peer_answering_ehlo_with_my_hostname_is_a_loop_and_bounces(start_mta, nursery):
    needs_root()
    peer = ScriptedPeer(ehlo_name="mx.test.example")  # trimail's own myhostname in these tests
    host = await start_on_port_25(nursery, peer)
    senders = ScriptedPeer()
    senders_port = await nursery.start(senders.run)
    srv = await start_mta(relayhost=f"[{host}]",
                          transport_maps=f"inline:{{ client.example=smtp:[127.0.0.1]:{senders_port} }}")
    await send(srv, "alice@client.example", ["r@far.example"])
    await wait_empty(srv)
    assert peer.received == []  # never sent
    [dsn] = senders.received
    message, recipients, _ = parse_dsn(dsn.data)
    assert recipients == [("rfc822; r@far.example", "failed", "5.4.6")]
    assert f"mail for {host} loops back to myself" in message.as_string()


async def test_a_220_greeting_with_my_hostname_is_only_logged_as_postfix_does(start_mta, nursery, caplog):
    """Postfix bounces on the EHLO reply's name only; a banner is free text (a load
    balancer, a copied configuration) and earns a warning."""
    needs_root()
    caplog.set_level(logging.WARNING, logger="trimail.smtp")
    peer = ScriptedPeer(greeting=b"220 mx.test.example ESMTP", ehlo_name="peer.test")
    host = await start_on_port_25(nursery, peer)
    srv = await start_mta(relayhost=f"[{host}]")
    await send(srv, "alice@client.example", ["r@far.example"])
    await wait_empty(srv)
    assert len(peer.received) == 1
    assert any("greeted me with my own hostname mx.test.example" in r.getMessage() for r in caplog.records)


async def test_the_same_name_on_another_port_is_a_content_filter_not_a_loop(start_mta, nursery):
    """Postfix checks loops only towards port 25: a filter on 127.0.0.1:10025 runs on this
    host and may well answer with its name."""
    peer = ScriptedPeer(ehlo_name="mx.test.example")
    port = await nursery.start(peer.run)
    srv = await start_mta(relayhost=f"[127.0.0.1]:{port}")
    await send(srv, "alice@client.example", ["r@far.example"])
    await wait_empty(srv)
    assert [r.rcpts for r in peer.received] == [[b"RCPT TO:<r@far.example>"]]


def outside_address() -> str:
    """An address of this host that is not loopback (the source address of the default
    route), found without trimail's own code."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.123", 9))
        except OSError:
            pytest.skip("no IPv4 route off this host")
        address = probe.getsockname()[0]
    if address.startswith("127."):
        pytest.skip("no IPv4 address besides loopback")
    return address


async def test_an_mx_at_my_own_address_when_listening_on_all_interfaces_bounces(start_mta, nursery):
    address = outside_address()
    own_port = free_port("0.0.0.0")
    senders = ScriptedPeer()
    senders_port = await nursery.start(senders.run)
    zone = {"loop.example": {"MX": ["10 me.loop.example."]}, "me.loop.example": {"A": [address]}}
    srv = await start_mta(zone, smtpd_listen=f"0.0.0.0:{own_port}",
                          transport_maps=f"inline:{{ client.example=smtp:[127.0.0.1]:{senders_port}, "
                                         f"loop.example=smtp:loop.example:{own_port} }}")
    await send(srv, "alice@client.example", ["r@loop.example"])
    await wait_empty(srv)
    [dsn] = senders.received
    message, recipients, _ = parse_dsn(dsn.data)
    assert recipients == [("rfc822; r@loop.example", "failed", "5.4.6")]
    assert "mail for loop.example loops back to myself" in message.as_string()


async def test_a_backup_mx_that_is_me_defers_when_the_better_one_is_down(start_mta):
    """Postfix truncates the MX list at its own preference: when it is a backup MX it
    tries only the better ones, and their failure is a deferral, not a loop."""
    own_port = free_port()
    zone = {"backup.example": {"MX": ["10 primary.backup.example.", "20 me.backup.example."]},
            "primary.backup.example": {"A": ["127.0.0.2"]},  # nothing listens: refused
            "me.backup.example": {"A": ["127.0.0.1"]}}
    srv = await start_mta(zone, smtpd_listen=f"127.0.0.1:{own_port}",
                          transport_maps=f"inline:{{ backup.example=smtp:backup.example:{own_port} }}")
    queue_id = await send(srv, "alice@client.example", ["r@backup.example"])
    reply = await deferred_once(srv, queue_id, "r@backup.example")
    assert reply.startswith("4.4.1 ") and "127.0.0.2" in reply


async def test_a_backup_mx_that_is_me_without_a_usable_primary_defers_unable_to_find_primary(start_mta):
    own_port = free_port()
    zone = {"backup.example": {"MX": ["10 gone.backup.example.", "20 me.backup.example."]},
            "me.backup.example": {"A": ["127.0.0.1"]}}  # gone.backup.example: NXDOMAIN
    srv = await start_mta(zone, smtpd_listen=f"127.0.0.1:{own_port}",
                          transport_maps=f"inline:{{ backup.example=smtp:backup.example:{own_port} }}")
    queue_id = await send(srv, "alice@client.example", ["r@backup.example"])
    reply = await deferred_once(srv, queue_id, "r@backup.example")
    assert reply == "4.4.4 unable to find primary relay for backup.example"


async def test_a_relay_sink_on_loopback_is_not_mistaken_for_me(start_mta, nursery):
    """The suite's own habit, relayhost = [127.0.0.1]:PORT, keeps working."""
    peer = ScriptedPeer()
    port = await nursery.start(peer.run)
    srv = await start_mta(relayhost=f"[127.0.0.1]:{port}")
    await send(srv, "alice@client.example", ["r@far.example"])
    await wait_empty(srv)
    assert len(peer.received) == 1


# -- reload ----------------------------------------------------------------------------


async def test_a_reload_changes_the_fan_out_bound(start_mta, nursery):
    peer = ScriptedPeer(greeting=b"421 4.3.2 busy, come back later")
    port = await nursery.start(peer.run)
    zone: dict = {"fan.example": {"MX": [f"10 mx{i}.fan.example." for i in range(30)]}}
    zone.update({f"mx{i}.fan.example": {"A": ["127.0.0.1"]} for i in range(30)})
    srv = await start_mta(zone, transport_maps=f"inline:{{ fan.example=smtp:fan.example:{port} }}")
    with open(srv.config.path, "a") as main_cf:
        main_cf.write("smtp_mx_address_limit = 3\n")
    assert await srv.reload() == "ok"
    queue_id = await send(srv, "a@client.example", ["r@fan.example"])
    await deferred_once(srv, queue_id, "r@fan.example")
    assert peer.connections == 3


async def test_a_listener_added_by_reload_counts_as_myself(start_mta, nursery):
    senders = ScriptedPeer()
    senders_port = await nursery.start(senders.run)
    first, added = free_port(), free_port()
    zone = {"loop.example": {"MX": ["10 me.loop.example."]}, "me.loop.example": {"A": ["127.0.0.1"]}}
    srv = await start_mta(zone, smtpd_listen=f"127.0.0.1:{first}",
                          transport_maps=f"inline:{{ client.example=smtp:[127.0.0.1]:{senders_port}, "
                                         f"loop.example=smtp:loop.example:{added} }}")
    text = srv.config.path.read_text().replace(f"smtpd_listen = 127.0.0.1:{first}",
                                               f"smtpd_listen = 127.0.0.1:{first}, 127.0.0.1:{added}")
    srv.config.path.write_text(text)
    assert await srv.reload() == "ok"
    await send(srv, "alice@client.example", ["r@loop.example"])
    await wait_for(lambda: len(senders.received) == 1, timeout=10)
    message, recipients, _ = parse_dsn(senders.received[0].data)
    assert recipients == [("rfc822; r@loop.example", "failed", "5.4.6")]
    assert "mail for loop.example loops back to myself" in message.as_string()


async def test_a_reload_takes_new_dns_nameservers_for_deliveries(start_mta, nursery):
    """Red team 33a: the queue manager kept the resolver it started with, so after a
    reload that changed ``dns_nameservers`` mail routed by MX still asked the old
    servers (and bounced 5.1.2 when they knew nothing) until a restart."""
    peer = ScriptedPeer()
    port = await nursery.start(peer.run)
    zone = {"far.example": {"MX": ["10 mx.far.example."]}, "mx.far.example": {"A": ["127.0.0.1"]}}
    knowing = await nursery.start(run_dns_server, zone)
    srv = await start_mta({}, transport_maps=f"inline:{{ far.example=smtp:far.example:{port} }}")  # knows nothing
    lines = [line for line in srv.config.path.read_text().splitlines() if not line.startswith("dns_nameservers")]
    srv.config.path.write_text("\n".join([*lines, f"dns_nameservers = 127.0.0.1:{knowing}", ""]))
    assert await srv.reload() == "ok"
    await send(srv, "<>", ["r@far.example"])
    await wait_empty(srv)
    assert len(peer.received) == 1


# -- a next hop that talks out of turn (red team 33a) -------------------------------


async def test_a_stray_reply_after_the_end_of_data_is_never_the_next_messages_answer(start_mta, nursery):
    """A server that answered the end of data with ``250`` and then ``550``: the next
    message on the cached connection took the stale 550 as its MAIL FROM reply and
    bounced, although the server never saw it.  A connection whose server said
    anything out of turn is not used again."""
    peer = ScriptedPeer(data_done_reply=b"250 2.0.0 Ok: queued\r\n550 5.7.1 leftover reply for nobody\r\n")
    port = await nursery.start(peer.run)
    srv = await start_mta(relayhost=f"[127.0.0.1]:{port}", smtp_connection_cache_time_limit="10s")
    for n in range(3):  # one after another: each could reuse the connection of the one before
        await send(srv, "<>", [f"r{n}@far.example"])
        await wait_empty(srv)
        await wait_for(lambda n=n: len(peer.received) == n + 1, timeout=10)
    assert [r.rcpts for r in peer.received] == [[f"RCPT TO:<r{n}@far.example>".encode()] for n in range(3)]


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "one-at-a-time"])
async def test_a_refusal_followed_by_a_close_is_the_answer(start_mta, nursery, pipelining):
    """``554`` to MAIL FROM and then a close: the message was deferred 4.4.2 (lost
    connection while receiving the RCPT TO reply, or the RSET's) and retried for the
    whole queue lifetime; it is refused, and bounces now."""
    peer = ScriptedPeer(mail_reply=b"554 5.7.1 go away\r\n", close_after_mail=True,
                        extensions=("PIPELINING", "8BITMIME") if pipelining else ("8BITMIME",))
    port = await nursery.start(peer.run)
    srv = await start_mta(relayhost=f"[127.0.0.1]:{port}")
    queue_id = await send(srv, "<>", ["r@far.example"])
    await wait_empty(srv)  # bounced: nothing left to retry
    assert peer.connections == 1 and queue_id not in queue(srv)
