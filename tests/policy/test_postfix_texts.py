"""Reply texts the differential suite (tests/differential) found differing from a real
Postfix 3.7, checked exactly here against a serve on real sockets (127.0.45.100, DNS on
127.0.45.101): a temporary DNS failure in reject_unknown_*_domain has Postfix's text,
HELO/EHLO without a name answer without an enhanced code, and VRFY's syntax reply names
the SMTPUTF8 option."""

from __future__ import annotations

import socket

import trio

from tests.conftest import write_main_cf
from tests.dnsserver import run_dns_server
from trimail import config as configuration
from trimail.master import serve

SERVER = "127.0.45.100"
ZONE = {"sick.example": "SERVFAIL", "good.example": {"A": ["127.0.45.2"]}}


def talk(port: int, lines: list[str]) -> list[str]:
    """The last line of each reply (the greeting first)."""
    with socket.create_connection((SERVER, port), timeout=30, source_address=("127.0.46.100", 0)) as sock:
        stream = sock.makefile("rb")

        def reply() -> str:
            while True:
                line = stream.readline().decode()
                if line[3:4] != "-":
                    return line.rstrip("\r\n")

        out = [reply()]
        for line in lines:
            sock.sendall(line.encode() + b"\r\n")
            out.append(reply())
        return out


async def start(nursery, tmp_path, **params):
    dns_port = await nursery.start(run_dns_server, ZONE, "127.0.45.101")
    path = write_main_cf(tmp_path, smtpd_listen=f"{SERVER}:0", dns_nameservers=f"127.0.45.101:{dns_port}",
                         mynetworks="127.0.45.0/24", alias_maps="", local_recipient_maps="", **params)
    srv = await nursery.start(serve, configuration.load(path))
    return srv.addresses[0].port


async def test_temporary_dns_failure_says_domain_not_found_as_postfix(nursery, tmp_path):
    port = await start(nursery, tmp_path, relay_domains="good.example, sick.example",
                       smtpd_sender_restrictions="reject_unknown_sender_domain",
                       smtpd_recipient_restrictions="reject_unknown_recipient_domain")
    got = await trio.to_thread.run_sync(talk, port, [
        "HELO client.example", "MAIL FROM:<a@sick.example>", "RCPT TO:<r@good.example>", "RSET",
        "MAIL FROM:<a@good.example>", "RCPT TO:<r@sick.example>", "QUIT"])
    assert got[3] == "450 4.1.8 <a@sick.example>: Sender address rejected: Domain not found"
    assert got[6] == "450 4.1.2 <r@sick.example>: Recipient address rejected: Domain not found"


async def test_helo_ehlo_and_vrfy_syntax_replies_are_postfix_words(nursery, tmp_path):
    port = await start(nursery, tmp_path)
    got = await trio.to_thread.run_sync(talk, port, ["HELO", "EHLO", "HELO client.example", "VRFY", "QUIT"])
    assert got[1:5] == ["501 Syntax: HELO hostname", "501 Syntax: EHLO hostname", "250 mx.test.example",
                        "501 5.5.4 Syntax: VRFY address [SMTPUTF8]"]
