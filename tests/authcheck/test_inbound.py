"""Authentication-Results on mail received from outside mynetworks: a real serve, a
real DNS server on loopback publishing SPF, DKIM and DMARC records, smtplib as the
client; the queued header read back and parsed with the ``authres`` package, field
by field.

Loopback addresses of this test module: serve on 127.0.47.5, the DNS server on
127.0.47.6, a DNS server that never answers on 127.0.47.7; clients 127.0.47.20
and .21 (outside mynetworks) and 127.0.47.10 (mynetworks)."""

from __future__ import annotations

import logging
import smtplib
import threading

import authres
import dkim
import pytest
import trio

from tests.authcheck.keys import MESSAGE, new_key, txt
from tests.conftest import write_main_cf
from tests.dnsserver import run_dns_server
from trimail import config as configuration
from trimail.authcheck.dmarc import from_domain
from trimail.authcheck.inbound import LARGE_MESSAGE, LARGE_SLOTS, LONG_HEADER
from trimail.master import serve
from trimail.queue.store import Store

RSA_PEM, RSA_TXT = new_key("rsa")
ZONE: dict = {
    "sender.example": {"TXT": [txt("v=spf1 ip4:127.0.47.20 -all")]},
    "soft.example": {"TXT": [txt("v=spf1 ip4:192.0.2.1 ~all")]},
    "broken.example": {"TXT": [txt("v=spf1 ip4:127.0.47.20 bogus -all")]},
    "sick.example": "SERVFAIL",
    "helo.example": {"TXT": [txt("v=spf1 ip4:127.0.47.20 -all")]},
    "rsa._domainkey.sender.example": {"TXT": [RSA_TXT]},
    "_dmarc.sender.example": {"TXT": [txt("v=DMARC1; p=reject")]},
    "_dmarc.soft.example": {"TXT": [txt("v=DMARC1; p=quarantine")]},
}


def signed(message: bytes = MESSAGE) -> bytes:
    return dkim.sign(message, b"rsa", b"sender.example", RSA_PEM, canonicalize=(b"relaxed", b"relaxed")) + message


def from_header(domain: str, message: bytes = MESSAGE) -> bytes:
    return message.replace(b"alice@mail.sender.example", f"alice@{domain}".encode())


async def blackhole(*, task_status=trio.TASK_STATUS_IGNORED):
    """A DNS server that reads queries and never answers."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await sock.bind(("127.0.47.7", 0))
    task_status.started(sock.getsockname()[1])
    with sock:
        while True:
            await sock.recvfrom(4096)


@pytest.fixture
def start(nursery, tmp_path):
    async def start(zone: dict | None = None, nameserver: str | None = None, **params):
        if nameserver is None:
            port = await nursery.start(run_dns_server, ZONE if zone is None else zone, "127.0.47.6")
            nameserver = f"127.0.47.6:{port}"
        settings = {"smtpd_listen": "127.0.47.5:0", "dns_nameservers": nameserver, "mynetworks": "127.0.47.10/32",
                    "relay_domains": "rcpt.example", "smtpd_peername_lookup": "no"}
        settings.update(params)
        return await nursery.start(serve, configuration.load(write_main_cf(tmp_path, **settings)))

    return start


def send(port: int, message: bytes, sender: str = "bounce@sender.example", client: str = "127.0.47.20",
         helo: str = "helo.example") -> tuple[int, bytes]:
    """The reply to MAIL FROM when refused, else to the end of DATA."""
    with smtplib.SMTP("127.0.47.5", port, local_hostname=helo, timeout=30, source_address=(client, 0)) as smtp:
        smtp.ehlo()
        reply = smtp.mail(sender)
        if reply[0] != 250:
            return reply
        assert smtp.rcpt("bob@rcpt.example")[0] == 250
        return smtp.data(message)


async def sent(srv, message: bytes, **kwargs) -> tuple[tuple[int, bytes], bytes | None]:
    reply = await trio.to_thread.run_sync(lambda: send(srv.addresses[0].port, message, **kwargs))
    store = Store.open(srv.config.queue_directory, readonly=True)
    try:
        queued = [store.read_content(m.id) for m in store.list_messages()]
    finally:
        store.close()
    return reply, (queued[-1] if queued else None)


def fields(content: bytes) -> list[tuple[str, str]]:
    head = content.split(b"\r\n\r\n", 1)[0].decode()
    out: list[tuple[str, str]] = []
    for line in head.split("\r\n"):
        if line[:1] in " \t":
            out[-1] = (out[-1][0], out[-1][1] + "\r\n" + line)
        else:
            name, _, value = line.partition(":")
            out.append((name, value))
    return out


def auth_results(content: bytes) -> list[authres.AuthenticationResultsHeader]:
    return [authres.AuthenticationResultsHeader.parse(f"{name}:{value}")
            for name, value in fields(content) if name.lower() == "authentication-results"]


def summary(header: authres.AuthenticationResultsHeader) -> list[tuple]:
    return [(r.method, r.result, {f"{p.type}.{p.name}": p.value for p in r.properties}) for r in header.results]


async def test_signed_mail_from_an_spf_designated_client_passes_everything(start):
    srv = await start()
    reply, content = await sent(srv, signed())
    assert reply[0] == 250
    names = [name for name, _ in fields(content)]
    assert names[:2] == ["Received", "Authentication-Results"]  # ours, right after our Received:
    [header] = auth_results(content)
    assert header.authserv_id == "mx.test.example"
    assert summary(header) == [
        ("spf", "pass", {"smtp.mailfrom": "bounce@sender.example"}),
        ("dkim", "pass", {"header.d": "sender.example", "header.s": "rsa", "header.a": "rsa-sha256",
                          "header.b": summary(header)[1][2]["header.b"]}),
        ("dmarc", "pass", {"header.from": "mail.sender.example"}),
    ]
    # the message itself is untouched: its signature still verifies downstream
    assert dkim.verify(content, dnsfunc=lambda name, timeout=5: RSA_TXT.replace('" "', "").strip('"').encode())


async def test_unsigned_mail_from_an_undesignated_client_fails_and_is_still_accepted(start):
    srv = await start()
    reply, content = await sent(srv, MESSAGE, client="127.0.47.21")
    assert reply[0] == 250
    [header] = auth_results(content)
    assert summary(header) == [
        ("spf", "fail", {"smtp.mailfrom": "bounce@sender.example"}),
        ("dkim", "none", {}),
        ("dmarc", "fail", {"header.from": "mail.sender.example"}),
    ]
    assert b"dmarc=fail (p=reject dis=REJECT) header.from=mail.sender.example" in content


@pytest.mark.parametrize(("sender", "spf", "dmarc"), [
    ("bounce@soft.example", "softfail", "fail"),
    ("bounce@nospf.example", "none", "none"),
    ("bounce@sick.example", "temperror", "none"),
    ("bounce@broken.example", "permerror", "none"),
])
async def test_spf_results_in_the_header(start, sender, spf, dmarc):
    srv = await start()
    message = from_header(sender.partition("@")[2])
    reply, content = await sent(srv, message, sender=sender)
    assert reply[0] == 250
    [header] = auth_results(content)
    assert [(r.method, r.result) for r in header.results] == [("spf", spf), ("dkim", "none"), ("dmarc", dmarc)]


async def test_the_null_sender_is_checked_by_its_helo_name(start):
    srv = await start()
    _, content = await sent(srv, MESSAGE, sender="")
    [header] = auth_results(content)
    assert summary(header)[0] == ("spf", "pass", {"smtp.helo": "helo.example"})


async def test_a_broken_signature_is_reported_fail(start):
    srv = await start()
    _, content = await sent(srv, signed().replace(b"this is signed", b"this was changed"))
    [header] = auth_results(content)
    assert [(r.method, r.result) for r in header.results] == [("spf", "pass"), ("dkim", "fail"), ("dmarc", "pass")]


async def test_a_forged_header_with_our_authserv_id_is_removed_and_others_are_kept(start):
    srv = await start()
    forged = (b"Authentication-Results: MX.test.example;\r\n\tdkim=pass header.d=bank.example\r\n"
              b"Authentication-Results: (comment) mx.test.example; spf=pass\r\n"
              b"Authentication-Results: upstream.example; spf=pass smtp.mailfrom=x@y.example\r\n")
    _, content = await sent(srv, forged + MESSAGE, client="127.0.47.21")
    headers = auth_results(content)
    assert [h.authserv_id for h in headers] == ["mx.test.example", "upstream.example"]
    assert headers[0].results[0].result == "fail"  # ours, not the forgery
    assert b"bank.example" not in content


async def test_clients_in_mynetworks_get_no_header(start):
    srv = await start()
    _, content = await sent(srv, MESSAGE, client="127.0.47.10")
    assert auth_results(content) == []


async def test_empty_smtpd_authentication_checks_turns_the_header_off(start):
    srv = await start(smtpd_authentication_checks="")
    _, content = await sent(srv, MESSAGE, client="127.0.47.21")
    assert auth_results(content) == []


async def test_only_the_configured_checks_are_reported(start):
    srv = await start(smtpd_authentication_checks="dkim")
    _, content = await sent(srv, signed(), client="127.0.47.21")
    [header] = auth_results(content)
    assert [(r.method, r.result) for r in header.results] == [("dkim", "pass")]


@pytest.mark.parametrize(("sender", "client", "code", "text"), [
    ("bounce@sender.example", "127.0.47.21", 550, b"5.7.23 <bounce@sender.example>: Sender address rejected"),
    ("bounce@broken.example", "127.0.47.20", 550, b"5.7.24"),
    ("bounce@sick.example", "127.0.47.20", 451, b"4.7.24"),
])
async def test_smtpd_spf_reject_refuses_at_mail_from(start, caplog, sender, client, code, text):
    caplog.set_level(logging.INFO, logger="trimail")
    srv = await start(smtpd_spf_reject="fail, permerror, temperror")
    reply, content = await sent(srv, MESSAGE, sender=sender, client=client)
    assert reply[0] == code and reply[1].startswith(text), reply
    assert content is None
    assert any("NOQUEUE: reject: MAIL from" in r.getMessage() for r in caplog.records)


async def test_spf_softfail_is_not_refused_unless_named(start):
    srv = await start(smtpd_spf_reject="fail")
    reply, _ = await sent(srv, from_header("soft.example"), sender="bounce@soft.example")
    assert reply[0] == 250


async def test_smtpd_dmarc_reject_refuses_a_failing_message_of_a_reject_domain(start):
    srv = await start(smtpd_dmarc_reject="yes")
    reply, content = await sent(srv, MESSAGE, client="127.0.47.21")
    assert reply == (550, b"5.7.1 rejected by DMARC policy for mail.sender.example")
    assert content is None
    passed, content = await sent(srv, signed(), client="127.0.47.21")  # DKIM aligned: DMARC pass
    assert passed[0] == 250 and content is not None


async def test_a_from_field_with_deeply_nested_comments_is_still_judged_by_dmarc(start):
    """Red team 31: ``From: (((...))) Alice <...>`` with comments nested 2,000 deep made
    the stdlib's address parser (recursive per level) raise RecursionError: the
    message got 451 4.3.0 and a traceback in the log.  Now the address is read without
    the comments (cleanup.headers.header_addresses), and DMARC judges it as any other:
    unsigned mail of a p=reject domain from an unauthorized client is refused."""
    srv = await start(smtpd_dmarc_reject="yes")
    nested = MESSAGE.replace(b"From: Alice", b"From: " + b"(" * 2000 + b")" * 2000 + b" Alice")
    reply, content = await sent(srv, nested, client="127.0.47.21")
    assert reply == (550, b"5.7.1 rejected by DMARC policy for mail.sender.example")
    assert content is None


async def test_a_long_from_field_is_read_whole_and_off_the_event_loop(start, monkeypatch):
    """Red team 31: a ``From:`` padded to 90 kB (``<><><>...``, ``@.@.``) took the
    stdlib's address parser 0.2-0.3 s, every other session of the process waiting.
    A long header section's From: is now read on a thread; and read whole, since a
    From: cut short would make a padded message of a p=reject domain permerror, not
    fail, and dodge ``smtpd_dmarc_reject``."""
    threads = []

    def recording(header):
        threads.append(threading.current_thread() is threading.main_thread())
        return from_domain(header)

    monkeypatch.setattr("trimail.authcheck.inbound.from_domain", recording)
    srv = await start(smtpd_dmarc_reject="yes")
    padded = MESSAGE.replace(b"From: Alice", b"From: " + b"<>" * 45000 + b" Alice")
    assert len(padded) > 2 * LONG_HEADER
    reply, content = await sent(srv, padded, client="127.0.47.21")
    assert reply == (550, b"5.7.1 rejected by DMARC policy for mail.sender.example")
    assert threads == [False], "the From: of a long header section was read on the event loop's thread"
    reply, _ = await sent(srv, MESSAGE, client="127.0.47.21")  # a short one: right there, no thread
    assert reply[0] == 550 and threads == [False, True]


async def test_smtpd_dmarc_quarantine_hold_holds_the_message(start):
    srv = await start(smtpd_dmarc_quarantine="hold")
    reply, _ = await sent(srv, from_header("soft.example"), sender="bounce@soft.example")
    assert reply[0] == 250
    store = Store.open(srv.config.queue_directory, readonly=True)
    try:
        assert [m.state for m in store.list_messages()] == ["hold"]
    finally:
        store.close()


async def test_a_dns_server_that_never_answers_costs_the_time_budget_and_gives_temperror(start, nursery):
    port = await nursery.start(blackhole)
    srv = await start(nameserver=f"127.0.47.7:{port}", smtpd_authentication_timeout="1s")
    begun = trio.current_time()
    reply, content = await sent(srv, signed())
    assert reply[0] == 250
    assert trio.current_time() - begun < 8  # one budget (1s) per message, not the resolver's 10s per lookup
    [header] = auth_results(content)
    assert [(r.method, r.result) for r in header.results] == [
        ("spf", "temperror"), ("dkim", "temperror"), ("dmarc", "temperror")]


async def test_large_messages_are_checked_a_few_at_a_time(start, nursery):
    """Red team 31: 200 signed 9 MB messages at once grew one process to 5.7 GB (each
    check holds the whole message and copies of its body) and kept it from answering
    ``trimail status``.  A message over LARGE_MESSAGE is now checked only in one of
    LARGE_SLOTS slots.  Twice that many at once, each check waiting its whole budget
    (2 s) for a key record that never comes: the later ones wait for a slot, so the
    first reply after the slots' worth comes two budgets after the start."""
    port = await nursery.start(blackhole)
    srv = await start(nameserver=f"127.0.47.7:{port}", smtpd_authentication_timeout="2s",
                      smtpd_authentication_checks="dkim")
    line = b"x" * 76 + b"\r\n"
    big = signed(MESSAGE + line * (LARGE_MESSAGE // len(line) + 100))
    began = trio.current_time()
    ended: list[float] = []

    async def one() -> None:
        reply = await trio.to_thread.run_sync(lambda: send(srv.addresses[0].port, big, client="127.0.47.21"))
        assert reply[0] == 250, reply
        ended.append(trio.current_time() - began)

    async with trio.open_nursery() as clients:
        for _ in range(2 * LARGE_SLOTS):
            clients.start_soon(one)
    ended.sort()
    assert ended[LARGE_SLOTS] >= 2 * 2, ended  # (all at about 2 s before: every check at once)


async def test_smtpd_worker_processes_add_the_header_too(nursery, tmp_path, serve_process):
    port = await nursery.start(run_dns_server, ZONE, "127.0.47.6")
    path = write_main_cf(tmp_path, smtpd_listen="127.0.47.5:0", dns_nameservers=f"127.0.47.6:{port}",
                         mynetworks="127.0.47.10/32", relay_domains="rcpt.example", smtpd_peername_lookup="no",
                         smtpd_workers="2")
    served = await trio.to_thread.run_sync(serve_process, path)
    reply = await trio.to_thread.run_sync(lambda: send(served.port, signed()))
    assert reply[0] == 250
    queue_id = reply[1].decode().rsplit(" ", 1)[1]
    store = Store.open(tmp_path / "queue", readonly=True)
    try:
        content = store.read_content(queue_id)
    finally:
        store.close()
    [header] = auth_results(content)
    assert [(r.method, r.result) for r in header.results] == [("spf", "pass"), ("dkim", "pass"), ("dmarc", "pass")]
    assert served.stop() == 0


async def test_a_reload_turns_the_checks_off_for_new_sessions(start, tmp_path):
    srv = await start()
    _, content = await sent(srv, MESSAGE, client="127.0.47.21")
    assert len(auth_results(content)) == 1
    main_cf = tmp_path / "main.cf"
    main_cf.write_text(main_cf.read_text() + "smtpd_authentication_checks =\n")
    await srv.reload()
    _, content = await sent(srv, MESSAGE, client="127.0.47.21")
    assert auth_results(content) == []
