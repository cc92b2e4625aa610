"""smtpd_peername_lookup: the client's verified host name (reverse lookup, then
forward confirmation) in the log, in Received: and in reject texts, as Postfix
shows it; bounded and cached, so slow DNS costs no session latency worth the name.

Loopback addresses of this test module: 127.0.43.0/24 (serve on 127.0.43.5, the
DNS server on 127.0.43.6, clients from 127.0.43.20-.23)."""

from __future__ import annotations

import logging
import smtplib
import socket
import time

import trio

from tests.conftest import wait_for, write_main_cf
from tests.dnsserver import run_dns_server
from trimail import config as configuration
from trimail import peername
from trimail.master import serve
from trimail.queue.store import Store

ZONE = {
    "20.43.0.127.in-addr.arpa": {"PTR": ["client20.example.test."]},
    "client20.example.test": {"A": ["127.0.43.20"]},
    "21.43.0.127.in-addr.arpa": {"PTR": ["liar.example.test."]},  # does not resolve back
    "liar.example.test": {"A": ["127.0.43.99"]},
}


async def start(nursery, tmp_path, nameserver: str, **params):
    path = write_main_cf(tmp_path, smtpd_listen="127.0.43.5:0", dns_nameservers=nameserver,
                         mynetworks="127.0.43.20/31", **params)
    return await nursery.start(serve, configuration.load(path))


def session(port: int, client: str, recipient: str = "someone@far.example") -> tuple[float, tuple[int, bytes]]:
    """Greeting time and the reply to RCPT (and DATA when accepted) from source address *client*."""
    begun = time.monotonic()
    with smtplib.SMTP("127.0.43.5", port, local_hostname="helo.example.test", timeout=30,
                      source_address=(client, 0)) as smtp:
        greeted = time.monotonic() - begun
        smtp.ehlo()
        smtp.mail("a@client.example")
        reply = smtp.rcpt(recipient)
        if reply[0] == 250:
            reply = smtp.data("Subject: x\r\n\r\nbody\r\n")
    return greeted, reply


def logged(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records]


async def test_a_forward_confirmed_name_is_in_the_log_received_and_reject_texts(nursery, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="trimail")
    dns_port = await nursery.start(run_dns_server, ZONE, "127.0.43.6")
    srv = await start(nursery, tmp_path, f"127.0.43.6:{dns_port}",
                      smtpd_client_restrictions="check_client_access inline:{127.0.43.22=REJECT}")
    port = srv.addresses[0].port
    _, accepted = await trio.to_thread.run_sync(session, port, "127.0.43.20")
    assert accepted[0] == 250
    assert "connect from client20.example.test[127.0.43.20]" in logged(caplog)
    store = Store.open(srv.config.queue_directory, readonly=True)
    try:
        [message] = store.list_messages()
        content = store.read_content(message.id)
    finally:
        store.close()
    assert content is not None
    assert b"Received: from helo.example.test (client20.example.test [127.0.43.20])" in content
    # a PTR name that does not resolve back to the address is not used (Postfix: unknown)
    await trio.to_thread.run_sync(session, port, "127.0.43.21")
    assert "connect from unknown[127.0.43.21]" in logged(caplog)


async def test_the_reject_text_names_the_verified_client(nursery, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="trimail")
    zone = dict(ZONE, **{"22.43.0.127.in-addr.arpa": {"PTR": ["client22.example.test."]},
                         "client22.example.test": {"A": ["127.0.43.22"]}})
    dns_port = await nursery.start(run_dns_server, zone, "127.0.43.6")
    srv = await start(nursery, tmp_path, f"127.0.43.6:{dns_port}",
                      smtpd_client_restrictions="check_client_access inline:{127.0.43.22=REJECT}")
    _, refused = await trio.to_thread.run_sync(session, srv.addresses[0].port, "127.0.43.22")
    assert refused == (554, b"5.7.1 <client22.example.test[127.0.43.22]>: Client host rejected: Access denied")
    assert any(line.startswith("NOQUEUE: reject: RCPT from client22.example.test[127.0.43.22]: 554 ")
               for line in logged(caplog))


async def test_dns_that_does_not_answer_costs_one_bounded_wait_then_nothing(nursery, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="trimail")
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a resolver that never answers
    silent.bind(("127.0.43.6", 0))
    try:
        # no SPF at MAIL FROM: its lookup would wait for the silent resolver too (10 s a session)
        srv = await start(nursery, tmp_path, f"127.0.43.6:{silent.getsockname()[1]}",
                          smtpd_authentication_checks="")
        port = srv.addresses[0].port
        first, _ = await trio.to_thread.run_sync(session, port, "127.0.43.23")
        assert first < peername.LOOKUP_TIMEOUT + 1.0
        assert "connect from unknown[127.0.43.23]" in logged(caplog)
        again, _ = await trio.to_thread.run_sync(session, port, "127.0.43.23")
        assert again < 0.5  # cached: the second session does not wait again
    finally:
        silent.close()


async def test_peername_lookup_off_asks_no_dns(nursery, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="trimail")
    dns_port = await nursery.start(run_dns_server, ZONE, "127.0.43.6")
    srv = await start(nursery, tmp_path, f"127.0.43.6:{dns_port}", smtpd_peername_lookup="no")
    await trio.to_thread.run_sync(session, srv.addresses[0].port, "127.0.43.20")
    await wait_for(lambda: "connect from unknown[127.0.43.20]" in logged(caplog))
