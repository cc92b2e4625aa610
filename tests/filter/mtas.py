"""The pieces of a content-filter set-up on loopback (127.0.46.0/24): a gateway
trimail with ``content_filter`` and a ``reinject_listen`` listener, a second trimail
acting as the filter (it receives on its own address and relays everything back to
the gateway's reinjection listener, adding its ``Received:`` header), a DNS server,
and SMTP submission from a chosen source address."""

from __future__ import annotations

import smtplib
from pathlib import Path

import trio

from tests.conftest import wait_for, write_main_cf
from tests.dnsserver import run_dns_server
from trimail import config as configuration
from trimail.master import serve
from trimail.queue.store import Store

GATEWAY = "127.0.46.1"  # the gateway's listeners (port 25 stand-in and the reinjection one)
FILTER = "127.0.46.2"  # the content filter
FINAL = "127.0.46.3"  # the final destination (an aiosmtpd sink)
DNS = "127.0.46.9"
OUTSIDE = "127.0.46.20"  # a client source address outside the reinjection listener's mynetworks


async def start(nursery: trio.Nursery, directory: Path, **params: object):
    """A serve with its queue manager, configured in *directory*."""
    directory.mkdir(parents=True, exist_ok=True)
    dns_port = await nursery.start(run_dns_server, {}, DNS)
    settings: dict[str, object] = {"master_service_disable": "", "dns_nameservers": f"{DNS}:{dns_port}",
                                   "smtp_connect_timeout": "5s", "mydestination": "", "smtpd_workers": "0",
                                   "mynetworks": "127.0.0.0/8"}
    settings.update(params)
    return await nursery.start(serve, configuration.load(write_main_cf(directory, **settings)))


async def start_filter(nursery: trio.Nursery, directory: Path, port: int, reinject_port: int):
    """A second trimail as the content filter: it accepts from the gateway and relays
    everything back to the gateway's reinjection listener."""
    return await start(nursery, directory, myhostname="filter.test.example", smtpd_listen=f"{FILTER}:{port}",
                       relayhost=f"[{GATEWAY}]:{reinject_port}")


def send(host: str, port: int, sender: str, recipients: list[str], body: str = "Subject: test\r\n\r\nhello\r\n",
         source: str = GATEWAY) -> str:
    """One message over SMTP; its queue ID."""
    with smtplib.SMTP(host, port, timeout=30, source_address=(source, 0)) as client:
        client.ehlo("client.example")
        client.mail(sender)
        for rcpt in recipients:
            code, text = client.rcpt(rcpt)
            assert code == 250, (code, text)
        code, reply = client.data(body)
        assert code == 250, reply
        return reply.decode().rsplit(" ", 1)[1]


def queue(server) -> list:
    store = Store.open(server.config.queue_directory, readonly=True)
    try:
        return store.list_messages()
    finally:
        store.close()


async def wait_empty(*servers, timeout: float = 30) -> None:
    await wait_for(lambda: not any(queue(server) for server in servers), timeout)
