"""Masquerading where Postfix does it (issue 17, item 4).

Envelope senders are masqueraded for all mail; message headers only for mail in the
``local`` rewrite context: local submissions and SMTP clients that
``local_header_rewrite_clients`` names (default ``permit_inet_interfaces``).  Other
clients' headers are left alone unless ``remote_header_rewrite_domain`` is set.
A ``masquerade_domains`` entry with a leading dot never matches.

The serve listens on 127.0.44.1; a client connecting from 127.0.44.1 is "this host"
(permit_inet_interfaces), one from 127.0.44.2 is not.
"""

from __future__ import annotations

import re
import smtplib
import subprocess
import sys

import pytest
import trio

from tests.conftest import trimail, wait_for
from tests.delivery.test_delivery import wait_empty
from tests.peers import Sink
from trimail.cleanup.headers import address_spans
from trimail.cleanup.rewrite import LOCAL, REMOTE, RWR_PARAM, header_context, masquerade

SERVER = "127.0.44.1"  # the listening address: a client from here is permit_inet_interfaces
OUTSIDE = "127.0.44.2"  # another loopback address: not one serve listens on
NETWORK_CLIENT = "127.0.44.3"
SINK = "127.0.44.9"

MESSAGE = ("From: Joe <joe@host.client.example>\r\nTo: ann@eng.far.example\r\n"
           "Cc: bob@host.client.example\r\nReply-To: joe\r\nSubject: hello\r\n\r\nbody joe@host.client.example\r\n")


# -- masquerade_domains: Postfix's cleanup_masquerade_external ------------------

@pytest.mark.parametrize("domains, address, expected", [
    (["example.com"], "joe@host.sub.example.com", "joe@example.com"),
    (["example.com"], "joe@example.com", "joe@example.com"),
    (["example.com"], "joe@badexample.com", "joe@badexample.com"),  # a parent, not a suffix
    ([".example.com"], "joe@host.example.com", "joe@host.example.com"),  # a leading dot never matches
    ([".example.com"], "joe@a.b.example.com", "joe@a.b.example.com"),
    (["!.example.com", "example.com"], "joe@host.example.com", "joe@example.com"),
    (["!sub.example.com", "example.com"], "joe@host.sub.example.com", "joe@host.sub.example.com"),
    (["!!sub.example.com", "example.com"], "joe@host.sub.example.com", "joe@sub.example.com"),  # ! toggles
    (["sub.example.com", "example.com"], "joe@sub.example.com", "joe@sub.example.com"),  # equal: stop
    (["example.com", "sub.example.com"], "joe@host.sub.example.com", "joe@example.com"),  # order matters
    (["EXAMPLE.com"], "joe@Host.Example.COM", "joe@example.com"),
])
def test_masquerade_domains_match_as_postfix_matches_them(domains, address, expected):
    assert masquerade(address, domains, []) == expected


def test_a_message_without_a_context_record_is_local_and_remote_needs_the_domain():
    assert header_context({}, "") == LOCAL  # sendmail, bounces, mail queued before the record existed
    assert header_context({RWR_PARAM: LOCAL}, "") == LOCAL
    assert header_context({RWR_PARAM: REMOTE}, "") is None
    assert header_context({RWR_PARAM: REMOTE}, "example.com") == REMOTE


@pytest.mark.parametrize("value, addresses", [
    (' Joe <joe@host.example>', ["joe@host.example"]),
    (' "Joe, <x@y>" <joe@host.example>, ann (Ann, x) ,\r\n\tbob@b', ["joe@host.example", "ann", "bob@b"]),
    (" team: a@b, c;, d", ["a@b", "c", "d"]),  # a group's name is no address
    (" undisclosed-recipients:;", []),
    (" Undisclosed recipients", []),  # words with a space between: not surely an address
    (" <>, (just a comment)", []),
    (' "joe@evil.example" (a@b) <joe@host.example>', ["joe@host.example"]),
    (" =?utf-8?q?J=C3=B6?= <j@x.example>", ["j@x.example"]),
    (' "a\\"b" <"q"@x>', ['"q"@x']),  # an escaped quote does not end a quoted string
])
def test_only_addresses_are_found_in_a_header_value(value, addresses):
    assert [value[a:b] for a, b in address_spans(value)] == addresses


# -- real sessions --------------------------------------------------------------

def submit(port: int, source: str, body: str = MESSAGE, recipients: tuple[str, ...] = ("ann@eng.far.example",),
           login: tuple[str, str] | None = None) -> tuple[int, bytes]:
    """One message over SMTP from *source*; the MAIL FROM reply when it is refused."""
    with smtplib.SMTP(SERVER, port, timeout=30, source_address=(source, 0)) as client:
        client.ehlo("client.example")
        if login is not None:
            client.login(*login)
        code, text = client.mail("joe@host.client.example")
        if code != 250:
            return code, text
        for rcpt in recipients:
            assert client.rcpt(rcpt)[0] == 250
        code, text = client.data(body)
        assert code == 250, text
        return code, text


async def relay(start_mta, sink: Sink, **params):
    # far.example is a relay domain: any client may send to it, in mynetworks or not
    settings = {"smtpd_listen": f"{SERVER}:0", "mynetworks": "127.0.44.0/24", "relay_domains": "far.example",
                "masquerade_domains": "client.example far.example",
                "relayhost": f"[{SINK}]:{sink.port}", **params}
    return await start_mta(**settings)


async def one_message(srv, sink: Sink, source: str, **kwargs) -> tuple[str, list[str], bytes]:
    await trio.to_thread.run_sync(lambda: submit(srv.addresses[0].port, source, **kwargs))
    await wait_for(lambda: len(sink.messages) == 1, 20)
    await wait_empty(srv)
    [message] = sink.messages
    return message


def header_section(content: bytes) -> bytes:
    return content.split(b"\r\n\r\n", 1)[0] + b"\r\n"


async def test_a_client_on_one_of_our_addresses_has_its_headers_masqueraded(start_mta):
    with Sink(SINK) as sink:
        srv = await relay(start_mta, sink)
        sender, rcpts, content = await one_message(srv, sink, SERVER)
    assert sender == "joe@client.example"  # envelope_sender
    assert rcpts == ["ann@eng.far.example"]  # envelope_recipient is not in the default classes
    header = header_section(content)
    assert b"From: Joe <joe@client.example>\r\n" in header  # header_sender
    assert b"To: ann@far.example\r\n" in header and b"Cc: bob@client.example\r\n" in header  # header_recipient
    assert b"Reply-To: joe@mx.test.example\r\n" in header  # completed with $myorigin
    assert content.endswith(b"body joe@host.client.example\r\n")  # never the body


async def test_an_outside_client_keeps_its_headers_but_not_its_envelope_sender(start_mta):
    with Sink(SINK) as sink:
        srv = await relay(start_mta, sink)
        sender, _, content = await one_message(srv, sink, OUTSIDE)
    assert sender == "joe@client.example"  # Postfix masquerades the envelope of all mail
    header = header_section(content)
    assert b"From: Joe <joe@host.client.example>\r\n" in header
    assert b"To: ann@eng.far.example\r\n" in header and b"Cc: bob@host.client.example\r\n" in header
    assert b"Reply-To: joe\r\n" in header


@pytest.mark.parametrize("clients, source, masqueraded", [
    ("permit_mynetworks", NETWORK_CLIENT, True),
    ("permit_mynetworks", OUTSIDE, False),
    ("static:all", OUTSIDE, True),  # postconf(5): "static:all" makes every client local
    (f"inline:{{ {OUTSIDE}=yes }}", OUTSIDE, True),  # a bare table: check_address_map
    ("check_address_map cidr:CIDR", OUTSIDE, True),
    ("check_address_map cidr:CIDR", NETWORK_CLIENT, False),
    ("", SERVER, False),  # empty: no client is local, not even this host
    ("no_such_check, permit_inet_interfaces", SERVER, True),  # an unknown name is skipped (a warning)
])
async def test_local_header_rewrite_clients_chooses_the_context(start_mta, tmp_path, clients, source, masqueraded):
    (tmp_path / "clients.cidr").write_text(f"{OUTSIDE}/32 yes\n")
    clients = clients.replace("cidr:CIDR", f"cidr:{tmp_path / 'clients.cidr'}")
    with Sink(SINK) as sink:
        srv = await relay(start_mta, sink, mynetworks=f"{NETWORK_CLIENT}/32", local_header_rewrite_clients=clients)
        sender, _, content = await one_message(srv, sink, source)
    assert sender == "joe@client.example"
    assert (b"From: Joe <joe@client.example>\r\n" in content) is masqueraded
    assert (b"From: Joe <joe@host.client.example>\r\n" in content) is not masqueraded


async def sasl_relay(start_mta, sink: Sink, tmp_path):
    """A relay where only logins are local (permit_sasl_authenticated), with user joe."""
    srv = await relay(start_mta, sink, mynetworks="", smtpd_sasl_auth_enable="yes", smtpd_tls_auth_only="no",
                      smtpd_sasl_password_file=str(tmp_path / "sasl_passwd"),
                      local_header_rewrite_clients="permit_sasl_authenticated")
    added = await trio.to_thread.run_sync(lambda: subprocess.run(
        [sys.executable, "-m", "trimail", "passwd", "add", "joe", "-c", srv.config.source],
        input=b"correct horse\n", capture_output=True, timeout=60, check=False))
    assert added.returncode == 0, added.stderr
    return srv


async def test_an_authenticated_client_is_local_with_permit_sasl_authenticated(start_mta, tmp_path):
    with Sink(SINK) as sink:
        srv = await sasl_relay(start_mta, sink, tmp_path)
        _, _, content = await one_message(srv, sink, OUTSIDE, login=("joe", "correct horse"))
    assert b"From: Joe <joe@client.example>\r\n" in content


async def test_authenticating_mid_session_makes_the_next_message_local(start_mta, tmp_path):
    """The context is found once per session, and found again after AUTH: a message
    before AUTH keeps its headers, the next one in the same session is masqueraded."""
    with Sink(SINK) as sink:
        srv = await sasl_relay(start_mta, sink, tmp_path)

        def two_messages() -> None:
            with smtplib.SMTP(SERVER, srv.addresses[0].port, timeout=30, source_address=(OUTSIDE, 0)) as client:
                client.ehlo("client.example")
                client.sendmail("joe@host.client.example", ["ann@eng.far.example"],
                                MESSAGE.replace("hello", "before"))
                client.login("joe", "correct horse")
                client.sendmail("joe@host.client.example", ["ann@eng.far.example"],
                                MESSAGE.replace("hello", "after"))

        await trio.to_thread.run_sync(two_messages)
        await wait_for(lambda: len(sink.messages) == 2, 20)
        by_subject = {b"before" if b"Subject: before" in content else b"after": content
                      for _, _, content in sink.messages}
    assert b"From: Joe <joe@host.client.example>\r\n" in by_subject[b"before"]
    assert b"From: Joe <joe@client.example>\r\n" in by_subject[b"after"]


async def test_remote_header_rewrite_domain_completes_and_masquerades_other_clients_headers(start_mta):
    with Sink(SINK) as sink:
        srv = await relay(start_mta, sink, remote_header_rewrite_domain="domain.invalid")
        _, _, content = await one_message(srv, sink, OUTSIDE)
    assert b"From: Joe <joe@client.example>\r\n" in content and b"To: ann@far.example\r\n" in content
    assert b"Reply-To: joe@domain.invalid\r\n" in content  # postconf(5): "append the specified domain"


async def test_append_dot_mydomain_completes_header_addresses_of_local_mail(start_mta):
    body = "From: joe@host\r\nTo: ann@eng.far.example, bob\r\nSubject: x\r\n\r\nhi\r\n"
    with Sink(SINK) as sink:
        srv = await relay(start_mta, sink, append_dot_mydomain="yes", mydomain="inside.example",
                          myorigin="origin.example")
        _, _, content = await one_message(srv, sink, SERVER, body=body)
    assert b"From: joe@host.inside.example\r\nTo: ann@far.example, bob@origin.example\r\n" in content


async def test_a_table_that_cannot_answer_refuses_mail_from_for_now(start_mta, tmp_path):
    with Sink(SINK) as sink:
        srv = await relay(start_mta, sink, local_header_rewrite_clients=f"hash:{tmp_path / 'missing'}")
        code, _ = await trio.to_thread.run_sync(lambda: submit(srv.addresses[0].port, OUTSIDE))
    assert code == 451


async def test_a_local_submission_has_its_headers_masqueraded(start_mta):
    with Sink(SINK) as sink:
        srv = await relay(start_mta, sink, local_header_rewrite_clients="")  # sendmail is local whatever it says
        done = await trio.to_thread.run_sync(lambda: subprocess.run(
            [sys.executable, "-m", "trimail", "sendmail", "-f", "joe@host.client.example", "-c", srv.config.source,
             "ann@eng.far.example"], input=MESSAGE.replace("\r\n", "\n").encode(), capture_output=True, timeout=60, check=False))
        assert done.returncode == 0, done.stderr
        await wait_for(lambda: len(sink.messages) == 1, 20)
        [(sender, _, content)] = sink.messages
    assert sender == "joe@client.example"
    assert b"From: Joe <joe@client.example>\r\n" in content and b"To: ann@far.example\r\n" in content
    assert b"Reply-To: joe@mx.test.example\r\n" in content


@pytest.mark.parametrize("source, masqueraded", [(OUTSIDE, False), (SERVER, True)])
async def test_mail_forwarded_by_an_alias_keeps_the_context_it_came_with(start_mta, tmp_path, source, masqueraded):
    aliases = tmp_path / "aliases"
    aliases.write_text("staff: ann@eng.far.example\n")
    assert trimail("postalias", str(aliases)).returncode == 0
    with Sink(SINK) as sink:
        srv = await relay(start_mta, sink, alias_maps=f"hash:{aliases}")
        sender, rcpts, content = await one_message(srv, sink, source, recipients=("staff@mx.test.example",))
    assert rcpts == ["ann@eng.far.example"]
    assert sender == "joe@client.example"  # the forwarded envelope is masqueraded either way
    assert b"Delivered-To: staff@mx.test.example\r\n" in content
    assert (b"From: Joe <joe@client.example>\r\n" in content) is masqueraded
    assert (b"From: Joe <joe@host.client.example>\r\n" in content) is not masqueraded


async def test_a_local_mailbox_gets_the_message_as_masqueraded_as_mail_that_leaves(start_mta, tmp_path):
    """Postfix masquerades in cleanup, before the queue: a local mailbox sees the same
    rewritten headers and envelope sender as a server the mail is relayed to."""
    srv = await start_mta(smtpd_listen=f"{SERVER}:0", mynetworks="127.0.44.0/24", alias_maps="",
                          local_recipient_maps="", home_mailbox="", masquerade_domains="client.example")
    await trio.to_thread.run_sync(lambda: submit(srv.addresses[0].port, SERVER, recipients=("carol@mx.test.example",)))
    await wait_empty(srv)
    mbox = (tmp_path / "queue" / "mailboxes" / "carol").read_bytes()
    assert mbox.startswith(b"From joe@client.example ")  # the envelope sender
    assert b"\nFrom: Joe <joe@client.example>\n" in mbox and b"\nReply-To: joe@mx.test.example\n" in mbox
    assert mbox.rstrip(b"\n").endswith(b"body joe@host.client.example")  # never the body


@pytest.mark.parametrize("source, completed", [(SERVER, True), (OUTSIDE, False)])
async def test_a_local_context_client_gets_missing_from_date_and_message_id_added(start_mta, source, completed):
    """Postfix's cleanup (2.6 and later) adds a missing From:, Date: and Message-ID: to
    mail from clients in local_header_rewrite_clients, and leaves other clients' alone."""
    with Sink(SINK) as sink:
        srv = await relay(start_mta, sink)
        sender, _, content = await one_message(srv, sink, source, body="Subject: bare\r\n\r\nbody\r\n")
    header = header_section(content)
    assert sender == "joe@client.example"
    assert (b"\r\nFrom: <joe@client.example>\r\n" in header) is completed  # the (masqueraded) sender
    assert (b"\r\nDate: " in header) is completed
    assert (re.search(rb"\r\nMessage-Id: <[0-9A-Za-z]+@mx\.test\.example>\r\n", header) is not None) is completed
