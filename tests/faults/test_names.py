"""Names dnspython rejects: too long in wire form, a label over 63 octets, an empty
label, a U-label IDNA cannot encode.  As MAIL or RCPT they get ``501``; already in
the queue (queued by an older trimail or by sendmail) they bounce or are dropped,
and neither the delivery nor the bounce to a bad sender ends serve, then or after
a restart (issue 13, defect 3).
"""

from __future__ import annotations

import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.faults.conftest import assert_serving, integrity_ok, trimail_cmd, wait_until
from tests.peers import Sink
from trimail.queue.spool import Spool
from trimail.queue.store import NewMessage, Store

LONG_DOMAIN = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 62])  # 254 octets: wire form 256
LONG_LABEL = "x" * 64 + ".example"
EMPTY_LABEL = "a..b.example"
BAD_ULABEL = "ex\u200dample.example"  # ZERO WIDTH JOINER: IDNA 2008 has no encoding for it
LONG_ULABEL = "\u00e4" * 60 + ".example"  # 60 characters, but its A-label is over 63 octets

BAD_DOMAINS = [LONG_DOMAIN, LONG_LABEL, EMPTY_LABEL, BAD_ULABEL, LONG_ULABEL]
IDS = ["254-octets", "64-octet-label", "empty-label", "idna-invalid", "long-a-label"]


def _no_dns() -> str:
    """A loopback UDP port nobody answers on: trimail must not even ask."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def _reply(client: smtplib.SMTP, line: str) -> tuple[int, str]:
    client.putcmd(line)
    code, text = client.getreply()
    return code, text.decode("utf-8", "replace")


@pytest.mark.parametrize("domain", BAD_DOMAINS, ids=IDS)
def test_bad_dns_names_are_refused_at_mail_and_rcpt_and_serve_stays_up(daemon, domain: str) -> None:
    d = daemon(master_service_disable="qmgr")
    with smtplib.SMTP("127.0.0.1", d.port, timeout=30) as client:
        client.ehlo("client.example")
        client.command_encoding = "utf-8"  # SMTPUTF8 is declared on MAIL
        # a one-letter local part: the whole path stays within the 256 octets of RFC 5321
        code, text = _reply(client, f"MAIL FROM:<b@{domain}> SMTPUTF8")
        assert (code, text[:5]) == (501, "5.1.7"), text
        code, text = _reply(client, "MAIL FROM:<alice@client.example> SMTPUTF8")
        assert code == 250, text
        code, text = _reply(client, f"RCPT TO:<b@{domain}>")
        assert (code, text[:5]) == (501, "5.1.3"), text
        assert text == "5.1.3 Bad recipient address syntax"
        code, text = _reply(client, "RCPT TO:<bob@good.example>")
        assert code == 250, text  # the session goes on
    assert_serving(d)


def _queue(store: Store, sender: str, recipients: list[str]) -> str:
    from trimail.queue.ids import new_queue_id

    spool = Spool()
    spool.write(b"Subject: queued by an older trimail\r\nFrom: <" + sender.encode() + b">\r\n\r\nbody\r\n")
    queue_id = new_queue_id()
    with store.transaction():
        store.insert_message(NewMessage(queue_id, sender, recipients, spool, state="incoming",
                                        arrival_time=time.time(), protocol="ESMTP"))
    return queue_id


def test_queued_bad_names_bounce_and_do_not_crash_serve_or_its_restart(daemon, tmp_path: Path) -> None:
    with Sink() as sink:
        # viabad and viabad2 are routed to nexthops that are no DNS names (an MX lookup, an
        # address lookup): only the DNS edge sees them
        settings = {"transport_maps": f"inline:{{ good.example=smtp:[127.0.0.1]:{sink.port}, "
                                      f"viabad.example=smtp:{LONG_LABEL}, "
                                      f"viabad2.example=smtp:[{EMPTY_LABEL}] }}",
                    "dns_nameservers": _no_dns()}
        # serve once without the queue manager to create the queue, then queue mail behind its back
        first = daemon(master_service_disable="qmgr", **settings)
        assert first.proc.stop() == 0
        store = Store.open(first.queue_directory)
        try:
            # bad recipients from a good sender: they bounce to alice, at the sink
            _queue(store, "alice@good.example", [f"b@{domain}" for domain in BAD_DOMAINS])
            _queue(store, "alice@good.example", ["frank@viabad.example"])
            _queue(store, "alice@good.example", ["grace@viabad2.example"])
            # a bad sender: its bad recipient bounces, and the bounce to the bad sender cannot go out
            for domain in (LONG_DOMAIN, BAD_ULABEL):
                _queue(store, f"carol@{domain}", [f"dave@{LONG_LABEL}"])
            _queue(store, "alice@good.example", ["erin@good.example"])  # an ordinary message
        finally:
            store.close()

        d = daemon(**settings)
        _wait_alive(d, lambda: "erin@good.example" in sink.recorder.recipients())
        _wait_alive(d, lambda: len(_bounces(sink)) == 3)
        assert_serving(d)
        syntax = next(raw for raw in _bounces(sink) if b"b@" + LONG_LABEL.encode() in raw)
        for domain in BAD_DOMAINS:
            assert f"b@{domain}".encode() in syntax
        assert b"Status: 5.1.3" in syntax and b"bad address syntax" in syntax
        for recipient in (b"frank@viabad.example", b"grace@viabad2.example"):
            nexthop = next(raw for raw in _bounces(sink) if recipient in raw)
            assert b"Status: 5.1.2" in nexthop and b"bad destination host name" in nexthop
        # every message is done: delivered, bounced or (the bounces to bad senders) dropped
        _wait_alive(d, lambda: _queue_empty(d.queue_directory))
        assert_serving(d)
        assert d.proc.stop() == 0

        again = daemon(**settings)  # the restart: nothing left that could kill it
        assert_serving(again)
        assert integrity_ok(again.queue_directory) == "ok"
        assert len(_bounces(sink)) == 3 and sink.recorder.recipients().count("erin@good.example") == 1


def _bounces(sink: Sink) -> list[bytes]:
    return [raw for _, _, raw in sink.messages if b"multipart/report" in raw]


def _wait_alive(d, predicate, timeout: float = 30) -> None:
    """Wait for *predicate*, failing at once with serve's log if serve exits."""
    def done() -> bool:
        assert d.alive, "serve exited:\n" + "\n".join(d.proc.log[-30:])
        return predicate()

    wait_until(done, timeout=timeout)


def _queue_empty(queue_directory: Path) -> bool:
    result = trimail_cmd("queue", "list", "--json", "-c", str(queue_directory.parent / "main.cf"))
    return result.returncode == 0 and result.stdout.strip() in ("", "[]")


@pytest.mark.parametrize("domain", [LONG_DOMAIN, LONG_LABEL, EMPTY_LABEL, BAD_ULABEL], ids=IDS[:4])
def test_sendmail_refuses_a_bad_dns_name_with_a_data_error(daemon, domain: str) -> None:
    d = daemon(master_service_disable="qmgr")
    for args in ([f"b@{domain}"], ["-f", f"b@{domain}", "alice@good.example"]):
        result = subprocess.run([sys.executable, "-m", "trimail", "sendmail", "-c", str(d.config_path), *args],
                                input=b"Subject: x\n\nbody\n", capture_output=True, timeout=60)
        assert result.returncode == 65, result.stderr  # EX_DATAERR
        assert b"bad address syntax" in result.stderr, result.stderr
        assert b"Traceback" not in result.stderr
    assert _queue_empty(d.queue_directory)
    assert_serving(d)


def test_sendmail_refuses_a_sender_that_would_inject_a_command(daemon, tmp_path):
    """``-f 'a@x>\\r\\nRCPT TO:<injected@evil.example'`` must not reach the queue, where
    the SMTP client would write it into MAIL FROM and add a recipient downstream."""
    from tests.conftest import trimail

    served = daemon(master_service_disable="qmgr")
    for sender in ("a@x.example>\r\nRCPT TO:<injected@evil.example", "a\nb@x.example", "a b@x.example"):
        result = trimail("sendmail", "-c", str(served.config_path), "-f", sender, "bob@example.com")
        assert result.returncode == 65, (sender, result.returncode, result.stderr)
        assert "bad address syntax" in result.stderr
    listing = trimail("queue", "list", "--json", "-c", str(served.config_path))
    assert listing.stdout.strip() == "[]"
