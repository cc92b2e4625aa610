"""Session details as Postfix 3.7's smtpd has them (issue 17, item 6), over real sockets
to a real serve: the replies were taken from a Postfix 3.7 given the same main.cf lines.

- ``smtpd_delay_reject = no``: the client restrictions run at connect; a refusal is the
  greeting, then every command but QUIT gets ``503 5.7.0 Error: access denied for ...``;
- a message header or an HTTP verb sent as a command: ``221 2.7.0 Error: I can break
  rules, too. Goodbye.`` and the connection closes;
- unqualified addresses are qualified with ``$myorigin`` (a bare name is relay-checked
  and stored as ``user@$myorigin``); a bare ``postmaster`` is always accepted;
- ``reject_unknown_client_hostname`` answers with RFC 7372's ``4.7.25``.

Everything binds in 127.0.42.0/24 (the server on .1, clients on other addresses).
"""

from __future__ import annotations

import logging
import socket

import trio

from trimail.queue.store import Store

SERVER = "127.0.42.1"
INSIDE = "127.0.42.5"  # in mynetworks below
OUTSIDE = "127.0.42.20"
DENIED = "127.0.42.21"


def talk(port: int, source: str, lines: list[str]) -> list[str]:
    """The greeting and one reply per line (last lines of multi-line replies);
    "<EOF>" once the server has closed the connection."""
    with socket.create_connection((SERVER, port), timeout=30, source_address=(source, 0)) as sock:
        stream = sock.makefile("rb")

        def reply() -> str:
            while True:
                line = stream.readline()
                if not line:
                    return "<EOF>"
                if line[3:4] != b"-":
                    return line.decode().rstrip("\r\n")

        out = [reply()]
        for line in lines:
            if out[-1] == "<EOF>" or out[-1][:3] in ("221", "421"):
                break
            sock.sendall(line.encode() + b"\r\n")
            out.append(reply())
        if out[-1][:3] in ("221", "421"):
            out.append(reply())  # the server closes after these
        return out


def mail(port: int, source: str, sender: str, recipients: list[str]) -> tuple[list[str], str | None]:
    """RCPT replies and the queue id (None when nothing was accepted)."""
    lines = ["HELO client.example", f"MAIL FROM:<{sender}>", *[f"RCPT TO:<{r}>" for r in recipients]]
    got = talk(port, source, [*lines, "DATA", "Subject: bare\r\n\r\nx\r\n.", "QUIT"])
    rcpt = got[3:3 + len(recipients)]
    final = got[4 + len(recipients)]
    return rcpt, final.rsplit(" ", 1)[1] if final.startswith("250") else None


def queued(srv, queue_id: str) -> tuple[str, list[str]]:
    [info] = Store.open(srv.config.queue_directory, readonly=True).list_messages_by_id([queue_id])
    return info.sender, [r.address for r in info.recipients]


async def run(fn, *args):
    return await trio.to_thread.run_sync(fn, *args)


BASE = {"smtpd_listen": f"{SERVER}:0", "mynetworks": "127.0.42.0/29", "master_service_disable": "qmgr",
        "alias_maps": ""}


# -- smtpd_delay_reject = no ------------------------------------------------------


async def test_client_refused_at_connect_gets_the_refusal_as_greeting_and_503_to_all_but_quit(start_mta, caplog):
    caplog.set_level(logging.INFO, logger="trimail.smtpd")
    srv = await start_mta(**BASE, smtpd_delay_reject="no",
                          smtpd_client_restrictions=f"check_client_access inline:{{{DENIED}=REJECT}}")
    port = srv.addresses[0].port
    denied = f"503 5.7.0 Error: access denied for unknown[{DENIED}]"
    got = await run(talk, port, DENIED, ["EHLO client.example", "MAIL FROM:<a@client.example>", "NOOP", "RSET",
                                         "FOO", "HELP", "QUIT"])
    assert got == [f"554 5.7.1 <unknown[{DENIED}]>: Client host rejected: Access denied",
                   denied, denied, denied, denied, denied, denied, "221 2.0.0 Bye", "<EOF>"]
    assert any(f"NOQUEUE: reject: CONNECT from unknown[{DENIED}]: 554 5.7.1 <unknown[{DENIED}]>: Client host "
               "rejected: Access denied; proto=SMTP" == r.getMessage() for r in caplog.records), caplog.text
    # another client is greeted as usual
    got = await run(talk, port, OUTSIDE, ["EHLO client.example", "QUIT"])
    assert got[0].startswith("220 ") and got[1] == "250 CHUNKING" and got[2] == "221 2.0.0 Bye"


async def test_access_denied_session_still_ends_at_the_hard_error_limit(start_mta):
    srv = await start_mta(**BASE, smtpd_delay_reject="no", smtpd_hard_error_limit="3",
                          smtpd_client_restrictions="reject")
    got = await run(talk, srv.addresses[0].port, DENIED, ["NOOP", "NOOP", "NOOP", "NOOP"])
    # the refused greeting counts as the first error (Postfix)
    assert got[0] == f"554 5.7.1 <unknown[{DENIED}]>: Client host rejected: Access denied"
    assert got[1:3] == [f"503 5.7.0 Error: access denied for unknown[{DENIED}]"] * 2
    assert got[3] == "421 4.7.0 mx.test.example Error: too many errors"
    assert got[-1] == "<EOF>"


async def test_delay_reject_yes_refuses_the_client_at_rcpt_as_before(start_mta):
    srv = await start_mta(**BASE, smtpd_client_restrictions=f"check_client_access inline:{{{DENIED}=REJECT}}")
    got = await run(talk, srv.addresses[0].port, DENIED,
                    ["HELO client.example", "MAIL FROM:<a@client.example>", "RCPT TO:<x@mx.test.example>", "QUIT"])
    assert got[0].startswith("220 ") and got[1:3] == ["250 mx.test.example", "250 2.1.0 Ok"]
    assert got[3] == f"554 5.7.1 <unknown[{DENIED}]>: Client host rejected: Access denied"


async def test_unknown_client_hostname_is_4_7_25_in_the_greeting(start_mta):
    srv = await start_mta({"20.42.0.127.in-addr.arpa": "NXDOMAIN"}, **BASE, smtpd_delay_reject="no",
                          smtpd_client_restrictions="reject_unknown_client_hostname")
    got = await run(talk, srv.addresses[0].port, OUTSIDE, ["QUIT"])
    assert got == [f"450 4.7.25 Client host rejected: cannot find your hostname, [{OUTSIDE}]", "221 2.0.0 Bye",
                   "<EOF>"]


async def test_unknown_client_reject_code_sets_the_code_and_class(start_mta):
    srv = await start_mta({"20.42.0.127.in-addr.arpa": "NXDOMAIN"}, **BASE, unknown_client_reject_code="550",
                          smtpd_client_restrictions="reject_unknown_reverse_client_hostname")
    got = await run(talk, srv.addresses[0].port, OUTSIDE,
                    ["HELO c.example", "MAIL FROM:<a@client.example>", "RCPT TO:<x@mx.test.example>"])
    assert got[3] == f"550 5.7.1 Client host rejected: cannot find your reverse hostname, [{OUTSIDE}]"


# -- message headers and HTTP as commands ------------------------------------------


async def test_headers_and_http_verbs_as_commands_end_the_session(start_mta, caplog):
    caplog.set_level(logging.INFO, logger="trimail.smtpd")
    srv = await start_mta(**BASE)
    port = srv.addresses[0].port
    bye = "221 2.7.0 Error: I can break rules, too. Goodbye."
    for line in ["Subject: hello", "From: a@client.example", "Received: from x by y", "X-Foo:bar", "MAIL: x",
                 "GET / HTTP/1.0", "post /x", "CONNECT mx:25", ".", "<x>"]:
        got = await run(talk, port, OUTSIDE, ["HELO client.example", line, "NOOP"])
        assert got[1:] == ["250 mx.test.example", bye, "<EOF>"], (line, got)
    assert any(r.getMessage() == f"warning: non-SMTP command from unknown[{OUTSIDE}]: Subject: hello"
               or r.getMessage() == f"non-SMTP command from unknown[{OUTSIDE}]: Subject: hello"
               for r in caplog.records), caplog.text
    # not headers: a space before the colon, an unknown verb; white space before a verb
    got = await run(talk, port, OUTSIDE, ["Subject : x", "FOO bar", "  NOOP", "\tNOOP", "", "QUIT"])
    assert got[1:] == ["500 5.5.2 Error: command not recognized", "500 5.5.2 Error: command not recognized",
                       "250 2.0.0 Ok", "250 2.0.0 Ok", "500 5.5.2 Error: bad syntax", "221 2.0.0 Bye", "<EOF>"]


async def test_forbidden_commands_without_the_regexp_let_bogus_verbs_through(start_mta):
    srv = await start_mta(**BASE, smtpd_forbidden_commands="CONNECT GET POST")
    got = await run(talk, srv.addresses[0].port, OUTSIDE, [".", "GET /", "NOOP"])
    assert got[1:] == ["500 5.5.2 Error: command not recognized",
                       "221 2.7.0 Error: I can break rules, too. Goodbye.", "<EOF>"]


# -- unqualified addresses ----------------------------------------------------------


async def test_bare_names_are_qualified_with_myorigin_and_postmaster_is_always_accepted(start_mta):
    srv = await start_mta(**BASE, local_recipient_maps="inline:{alice=x}")
    port = srv.addresses[0].port
    # myorigin = $myhostname, a local domain: the local recipient table decides
    rcpt, queue_id = await run(mail, port, OUTSIDE, "user", ["bob", "Postmaster", "alice"])
    assert rcpt == ["550 5.1.1 <bob>: Recipient address rejected: User unknown in local recipient table",
                    "250 2.1.5 Ok", "250 2.1.5 Ok"]
    assert queued(srv, queue_id) == ("user@mx.test.example", ["Postmaster@mx.test.example", "alice@mx.test.example"])


async def test_a_bare_name_never_opens_the_relay(start_mta):
    srv = await start_mta(**BASE, myorigin="origin.test.example",
                          smtpd_relay_restrictions="permit_mynetworks, reject_unauth_destination")
    port = srv.addresses[0].port
    # myorigin is not ours: from outside, a bare name is mail for origin.test.example
    rcpt, queue_id = await run(mail, port, OUTSIDE, "user", ["alice", "remote.example!bob", "postmaster"])
    assert rcpt == ["554 5.7.1 <alice>: Relay access denied", "554 5.7.1 <remote.example!bob>: Relay access denied",
                    "250 2.1.5 Ok"]
    assert queued(srv, queue_id) == ("user@origin.test.example", ["postmaster@origin.test.example"])
    # a client in mynetworks may send to it, and it is stored qualified
    rcpt, queue_id = await run(mail, port, INSIDE, "user", ["alice"])
    assert rcpt == ["250 2.1.5 Ok"]
    assert queued(srv, queue_id) == ("user@origin.test.example", ["alice@origin.test.example"])


async def test_defer_if_permit_at_connect_is_answered_at_rcpt_unless_it_rejects(start_mta):
    srv = await start_mta(**BASE, smtpd_delay_reject="no", smtpd_client_restrictions="defer_if_permit",
                          smtpd_relay_restrictions="permit_mynetworks, reject_unauth_destination")
    got = await run(talk, srv.addresses[0].port, OUTSIDE,
                    ["HELO client.example", "MAIL FROM:<a@client.example>", "RCPT TO:<postmaster@mx.test.example>",
                     "RCPT TO:<x@far.example>", "QUIT"])
    assert got[0].startswith("220 ") and got[1:3] == ["250 mx.test.example", "250 2.1.0 Ok"]
    assert got[3:5] == [f"450 4.7.0 <unknown[{OUTSIDE}]>: Client host rejected: defer_if_permit requested",
                        "554 5.7.1 <x@far.example>: Relay access denied"]


async def test_sender_checks_see_a_bare_name_at_myorigin(start_mta):
    srv = await start_mta(**BASE, smtpd_sender_restrictions="reject_unknown_sender_domain, "
                                                            "check_sender_access inline:{user@mx.test.example=REJECT}")
    port = srv.addresses[0].port
    rcpt, _ = await run(mail, port, INSIDE, "user", ["postmaster@mx.test.example"])
    assert rcpt == ["554 5.7.1 <user>: Sender address rejected: Access denied"]
    rcpt, queue_id = await run(mail, port, INSIDE, "other", ["postmaster@mx.test.example"])
    assert rcpt == ["250 2.1.5 Ok"] and queued(srv, queue_id)[0] == "other@mx.test.example"
