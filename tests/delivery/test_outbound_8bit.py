"""SMTPUTF8 and 8BITMIME downstream (issue 14, section 4): mail that needs SMTPUTF8
bounces 5.6.7 when the next hop does not offer it, with an RFC 6533 DSN sent with
SMTPUTF8; 8-bit content to a server without 8BITMIME is converted to
quoted-printable, as Postfix does (disable_mime_output_conversion = no)."""

from __future__ import annotations

import email
import email.policy
import smtplib

import trio

from tests.delivery.outbound_peer import ScriptedPeer
from tests.delivery.test_delivery import wait_empty

PLAIN = ("PIPELINING",)  # a server that offers neither 8BITMIME nor SMTPUTF8


def submit(port: int, sender: str, recipients: list[str], body: bytes, options: list[str]) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.example")
        client.mail(sender, options)
        for rcpt in recipients:
            assert client.rcpt(rcpt)[0] == 250
        assert client.data(body)[0] == 250


async def send(srv, recipients: list[str], body: bytes, options: list[str], sender: str = "alice@client.example"):
    await trio.to_thread.run_sync(submit, srv.addresses[0].port, sender, recipients, body, options)


async def two_peers(nursery, extensions: tuple[str, ...]):
    dest, senders = ScriptedPeer(extensions=extensions), ScriptedPeer()
    return dest, await nursery.start(dest.run), senders, await nursery.start(senders.run)


# the client (loopback, one of serve's own addresses) is local-context by default and would
# get a missing From:, Date: and Message-ID: added as the message leaves; these tests look at
# the content's bytes, so the client is remote (cleanup adds nothing)
AS_SENT = {"local_header_rewrite_clients": ""}


def routes(dest_port: int, senders_port: int) -> str:
    return (f"inline:{{ far.example=smtp:[127.0.0.1]:{dest_port}, "
            f"client.example=smtp:[127.0.0.1]:{senders_port} }}")


async def test_a_utf8_recipient_to_a_server_without_smtputf8_bounces_5_6_7_with_a_utf8_dsn(start_mta, nursery):
    dest, dest_port, senders, senders_port = await two_peers(nursery, PLAIN)
    srv = await start_mta(transport_maps=routes(dest_port, senders_port), **AS_SENT)
    await send(srv, ["rené@far.example"], b"Subject: caf\xc3\xa9\r\n\r\nbonjour\r\n", ["SMTPUTF8", "BODY=8BITMIME"])
    await wait_empty(srv)
    assert dest.received == []  # never sent without SMTPUTF8
    [dsn] = senders.received
    assert b"SMTPUTF8" in dsn.mail.split(b" ", 2)[-1]  # the notification itself goes out with SMTPUTF8
    message = email.message_from_bytes(dsn.data, policy=email.policy.default)
    report = [p for p in message.iter_parts() if p.get_content_type() == "message/global-delivery-status"]
    assert report, [p.get_content_type() for p in message.iter_parts()]
    text = dsn.data.decode("utf-8")
    assert "Final-Recipient: utf-8; rené@far.example" in text
    assert "Original-Recipient: utf-8; rené@far.example" in text
    assert "Status: 5.6.7" in text
    unfolded = " ".join(text.split())  # (the report's lines are folded at 78 columns, as Postfix's)
    assert "message requires SMTPUTF8, but no server was found that supports SMTPUTF8" in unfolded


async def test_utf8_headers_need_smtputf8_too(start_mta, nursery):
    dest, dest_port, senders, senders_port = await two_peers(nursery, PLAIN)
    srv = await start_mta(transport_maps=routes(dest_port, senders_port), **AS_SENT)
    await send(srv, ["bob@far.example"], "From: Renée <renée@client.example>\r\n\r\nhi\r\n".encode(),
               ["SMTPUTF8", "BODY=8BITMIME"])
    await wait_empty(srv)
    assert dest.received == []
    [dsn] = senders.received
    assert "Status: 5.6.7" in dsn.data.decode("utf-8")


async def test_smtputf8_requested_but_all_ascii_goes_to_a_server_without_it(start_mta, nursery):
    dest, dest_port, senders, senders_port = await two_peers(nursery, PLAIN)
    srv = await start_mta(transport_maps=routes(dest_port, senders_port), **AS_SENT)
    await send(srv, ["bob@far.example"], b"Subject: plain\r\n\r\nhi\r\n", ["SMTPUTF8"])
    await wait_empty(srv)
    [got] = dest.received
    assert got.mail.startswith(b"MAIL FROM:<alice@client.example>") and b"SMTPUTF8" not in got.mail
    assert senders.received == []


async def test_a_utf8_recipient_to_a_server_with_smtputf8_is_delivered_with_it(start_mta, nursery):
    dest, dest_port, _senders, senders_port = await two_peers(nursery, ("8BITMIME", "SMTPUTF8"))
    srv = await start_mta(transport_maps=routes(dest_port, senders_port), **AS_SENT)
    await send(srv, ["rené@far.example"], b"Subject: caf\xc3\xa9\r\n\r\nbonjour\r\n", ["SMTPUTF8", "BODY=8BITMIME"])
    await wait_empty(srv)
    [got] = dest.received
    assert b"SMTPUTF8" in got.mail and got.rcpts == ["RCPT TO:<rené@far.example>".encode()]
    assert got.data.endswith(b"Subject: caf\xc3\xa9\r\n\r\nbonjour\r\n")


EIGHT_BIT_MESSAGE = (b"MIME-Version: 1.0\r\n"
                     b"Content-Type: text/plain; charset=utf-8\r\n"
                     b"Content-Transfer-Encoding: 8bit\r\n"
                     b"Subject: menu\r\n"
                     b"\r\n"
                     b"caf\xc3\xa9 = 2\xe2\x82\xac  \r\n"
                     + b"x" * 100 + b"\r\n")


async def test_8bit_text_to_a_server_without_8bitmime_is_sent_as_quoted_printable(start_mta, nursery):
    dest, dest_port, _senders, senders_port = await two_peers(nursery, ("SIZE 100000", "PIPELINING"))
    srv = await start_mta(transport_maps=routes(dest_port, senders_port), **AS_SENT)
    await send(srv, ["bob@far.example"], EIGHT_BIT_MESSAGE, ["BODY=8BITMIME"])
    await wait_empty(srv)
    [got] = dest.received
    assert got.mail == b"MAIL FROM:<alice@client.example>"  # no BODY=8BITMIME, no SIZE (it changed)
    assert got.data.isascii()
    headers, _, body = got.data.partition(b"\r\n\r\n")
    assert b"Content-Transfer-Encoding: 8bit" not in headers
    assert headers.endswith(b"Subject: menu\r\nContent-Transfer-Encoding: quoted-printable")
    assert body == (b"caf=C3=A9 =3D 2=E2=82=AC =20\r\n"
                    + b"x" * 73 + b"=\r\n" + b"x" * 27 + b"\r\n")
    message = email.message_from_bytes(got.data, policy=email.policy.default)
    assert message.get_content().replace("\r\n", "\n") == "café = 2€  \n" + "x" * 100 + "\n"


async def test_8bit_text_to_a_server_with_8bitmime_goes_as_it_is(start_mta, nursery):
    dest, dest_port, _senders, senders_port = await two_peers(nursery, ("8BITMIME",))
    srv = await start_mta(transport_maps=routes(dest_port, senders_port), **AS_SENT)
    await send(srv, ["bob@far.example"], EIGHT_BIT_MESSAGE, ["BODY=8BITMIME"])
    await wait_empty(srv)
    [got] = dest.received
    assert got.mail.endswith(b" BODY=8BITMIME")
    assert got.data.endswith(EIGHT_BIT_MESSAGE)


async def test_disable_mime_output_conversion_sends_8bit_as_it_is(start_mta, nursery):
    dest, dest_port, _senders, senders_port = await two_peers(nursery, PLAIN)
    srv = await start_mta(transport_maps=routes(dest_port, senders_port), **AS_SENT, disable_mime_output_conversion="yes")
    await send(srv, ["bob@far.example"], EIGHT_BIT_MESSAGE, ["BODY=8BITMIME"])
    await wait_empty(srv)
    [got] = dest.received
    assert got.data.endswith(EIGHT_BIT_MESSAGE)


MULTIPART = (b"MIME-Version: 1.0\r\n"
             b"Content-Type: multipart/mixed; boundary=\"==b1\"\r\n"
             b"Content-Transfer-Encoding: 8bit\r\n"
             b"\r\n"
             b"--==b1\r\n"
             b"Content-Type: text/plain; charset=iso-8859-1\r\n"
             b"Content-Transfer-Encoding: 8bit\r\n"
             b"\r\n"
             b"d\xe9j\xe0 vu\r\n"
             b"--==b1\r\n"
             b"Content-Type: text/plain\r\n"
             b"\r\n"
             b"plain = ascii\r\n"
             b"--==b1--\r\n")


async def test_an_8bit_multipart_is_relabelled_7bit_and_its_8bit_parts_converted(start_mta, nursery):
    dest, dest_port, _senders, senders_port = await two_peers(nursery, PLAIN)
    srv = await start_mta(transport_maps=routes(dest_port, senders_port), **AS_SENT)
    await send(srv, ["bob@far.example"], MULTIPART, ["BODY=8BITMIME"])
    await wait_empty(srv)
    [got] = dest.received
    assert got.data.isascii()
    assert got.data.endswith(b"MIME-Version: 1.0\r\n"
                             b"Content-Type: multipart/mixed; boundary=\"==b1\"\r\n"
                             b"Content-Transfer-Encoding: 7bit\r\n"
                             b"\r\n"
                             b"--==b1\r\n"
                             b"Content-Type: text/plain; charset=iso-8859-1\r\n"
                             b"Content-Transfer-Encoding: quoted-printable\r\n"
                             b"\r\n"
                             b"d=E9j=E0 vu\r\n"
                             b"--==b1\r\n"
                             b"Content-Type: text/plain\r\n"
                             b"\r\n"
                             b"plain = ascii\r\n"  # a 7bit part is left alone
                             b"--==b1--\r\n")
    message = email.message_from_bytes(got.data, policy=email.policy.default)
    assert [p.get_content() for p in message.iter_parts()] == ["déjà vu", "plain = ascii"]
