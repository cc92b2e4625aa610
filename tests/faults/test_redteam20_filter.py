"""Red team (session 20) of the after-queue content filter (issue 20 §2) against a
real ``trimail serve`` with its queue manager: hostile FILTER nexthops from an
access table, a content_filter that points back at the gateway itself, filters
that reject after accepting or never answer, reloads with junk overrides.  What
must hold: nothing ends serve or its qmgr, hostile mail is deferred or bounced (never
delivered around the filter), and the next message still goes through.

Every test binds only loopback addresses in 127.0.62.0/24 (.1-.99 here).
"""

from __future__ import annotations

import smtplib
from pathlib import Path

import trio

from tests.conftest import wait_for, write_main_cf
from tests.dnsserver import run_dns_server
from tests.filter.mtas import queue, send
from tests.peers import Sink
from trimail import config as configuration
from trimail.master import serve

GATEWAY = "127.0.62.1"
FINAL = "127.0.62.3"
DNS = "127.0.62.9"
FILTERHOST = "127.0.62.2"


async def start(nursery: trio.Nursery, directory: Path, **params: object):
    directory.mkdir(parents=True, exist_ok=True)
    dns_port = await nursery.start(run_dns_server, {}, DNS)
    settings: dict[str, object] = {"master_service_disable": "", "dns_nameservers": f"{DNS}:{dns_port}",
                                   "smtp_connect_timeout": "2s", "mydestination": "", "smtpd_workers": "0",
                                   "mynetworks": "127.0.0.0/8", "myhostname": "mx.test.example",
                                   "smtpd_listen": f"{GATEWAY}:0"}
    settings.update(params)
    return await nursery.start(serve, configuration.load(write_main_cf(directory, **settings)))


def replies(server, queue_id: str) -> list[tuple[str, str | None]]:
    return [(r.status, r.last_reply) for m in queue(server) if m.id == queue_id for r in m.recipients]


def rcpt_reply(port: int, recipient: str) -> tuple[int, bytes]:
    with smtplib.SMTP(GATEWAY, port, timeout=30, source_address=(GATEWAY, 0)) as client:
        client.ehlo("client.example")
        client.mail("a@client.example")
        return client.rcpt(recipient)


HOSTILE_NEXTHOPS = {
    "port-out-of-range": f"smtp:[{FILTERHOST}]:99999",  # was queued, then deferred "internal error" for ever
    "port-2-to-the-16": f"lmtp:[{FILTERHOST}]:65536",
    "space-in-host": "smtp:evil host.example",  # was queued, then bounced: "Host not found" for a typo
    "long-host": "smtp:" + "a" * 10_000,  # was queued, then bounced with the 10 KB name in the DSN
    "long-bracketed-host": "smtp:[" + "a" * 300 + "]:25",
}


async def test_a_filter_nexthop_that_cannot_be_used_is_a_451_not_a_queued_message(nursery, tmp_path):
    """An access table's FILTER whose nexthop no delivery can use (port beyond 65535,
    white space in the host, a host longer than a DNS name) is an operator's mistake:
    smtpd answers ``451 4.3.5`` as for any bad FILTER (the sender retries; the mail
    neither bypasses the filter nor bounces), and other mail still flows."""
    names = list(HOSTILE_NEXTHOPS)
    rules = ", ".join(f"{{ {name}@remote.example=FILTER {HOSTILE_NEXTHOPS[name]} }}" for name in names)
    with Sink(FINAL) as sink:
        gw = await start(nursery, tmp_path / "gw", relayhost=f"[{FINAL}]:{sink.port}",
                         smtpd_recipient_restrictions=f"check_recipient_access inline:{{ {rules} }}, permit_mynetworks")
        port = gw.addresses[0].port
        for name in names:
            code, text = await trio.to_thread.run_sync(rcpt_reply, port, f"{name}@remote.example")
            assert (code, text[:5]) == (451, b"4.3.5"), (name, code, text)
        await trio.to_thread.run_sync(send, GATEWAY, port, "a@client.example", ["plain@remote.example"])
        await wait_for(lambda: len(sink.messages) >= 1 and not queue(gw), 10)
        assert [recipients for _, recipients, _ in sink.messages] == [["plain@remote.example"]]


def test_control_characters_in_a_filter_nexthop_are_refused():
    """CR/LF or NUL in a nexthop (from a table or policy service) would reach the log
    line and the bounce's Diagnostic-Code field; a nexthop never holds them."""
    from trimail.config.params_filter import filter_problem
    for text in ("smtp:[127.0.62.2]\r\nX-Injected: 1", "smtp:a\nb", "smtp:[a\x00b]:25", "smtp:a\tb"):
        assert filter_problem(text).startswith("bad nexthop"), repr(text)
    for text in ("smtp:[127.0.62.2]:10024", "lmtp:[::1]:24", "smtp:[::ffff:127.0.62.2]", "smtp:mx.example:587",
                 "relay:", "smtp:[127.0.62.2]:0"):
        assert filter_problem(text) == "", text
