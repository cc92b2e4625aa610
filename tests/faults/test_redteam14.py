"""Red team of issue 14's new code against a real ``trimail serve``: what an outsider
(or a message from one) can do to the MIME downgrade, address verification, the
access-table FILTER and the DATA reader.  Each test failed on the commit it was
written against (or is a guard, said so), and asserts what matters: serve keeps
answering, nothing acknowledged is lost, the fan-out stays bounded."""

from __future__ import annotations

import smtplib

import trio

from tests.delivery.outbound_peer import ScriptedPeer
from tests.faults.conftest import assert_serving, integrity_ok, send, wait_until
from tests.faults.test_outbound import trio_thread


class CountingPeer:
    """A downstream that counts connections and answers every RCPT with *rcpt_reply*
    (the internal server of a gateway that uses reject_unverified_recipient)."""

    def __init__(self, rcpt_reply: bytes) -> None:
        self.rcpt_reply = rcpt_reply
        self.connections = 0
        self.rcpts: list[bytes] = []

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        buf = bytearray()
        async with stream:
            try:
                await stream.send_all(b"220 internal.test ESMTP\r\n")
                while True:
                    while b"\r\n" not in buf:
                        data = await stream.receive_some(4096)
                        if not data or len(buf) > 1 << 16:
                            return
                        buf += data
                    end = buf.index(b"\r\n")
                    cmd, buf[:] = bytes(buf[:end]), buf[end + 2:]
                    verb = cmd[:4].upper()
                    if verb == b"EHLO":
                        await stream.send_all(b"250-internal.test\r\n250 PIPELINING\r\n")
                    elif verb == b"RCPT":
                        self.rcpts.append(cmd)
                        await stream.send_all(self.rcpt_reply + b"\r\n")
                    elif verb == b"QUIT":
                        await stream.send_all(b"221 2.0.0 Bye\r\n")
                        return
                    else:
                        await stream.send_all(b"250 2.0.0 Ok\r\n")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return


# -- 1. the MIME downgrade must not stall serve ------------------------------------


def test_a_content_transfer_encoding_full_of_parentheses_does_not_stall_serve(daemon):
    """The downgrader stripped RFC 822 comments from Content-Transfer-Encoding with
    ``\\([^)]*\\)``: quadratic in a value of unclosed ``(``.  A part header of ~1 MiB of
    them (folded: each line under the converter's line bound, the block under its
    header bound; the message well under message_size_limit) held the event loop for
    minutes, so serve answered no one while it 'converted'.  Now: delivered at once."""
    plain = ScriptedPeer(extensions=("PIPELINING",))  # no 8BITMIME: the converter runs
    folded = b"".join(b" " + b"(" * 60_000 + b"\r\n" for _ in range(16))
    body = (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n"
            b"--b\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding:\r\n" + folded +
            b"\r\n caf\xc3\xa9\r\n--b--\r\n")
    with trio_thread((plain.run,)) as (port,):
        d = daemon(transport_maps=f"inline:{{ far.example=smtp:[127.0.0.1]:{port} }}")
        send(d.port, ["r@far.example"], body=body)
        wait_until(lambda: len(plain.received) == 1, timeout=20)
        assert_serving(d)
        assert b"caf\xc3\xa9" in plain.received[0].data  # not labelled 8bit: passed as it came
        assert integrity_ok(d.queue_directory) == "ok"


# -- 2. address verification must not multiply an outsider's RCPTs -----------------


def test_a_tempfailing_verification_is_not_reprobed_for_every_rcpt(daemon):
    """reject_unverified_recipient never remembered a temporary answer ("not verified
    yet" was never cached), so every RCPT an outsider sent for an address whose probe
    got a 4xx (an internal server greylisting, rate limiting or down) opened one more
    connection to the internal server: 8 RCPTs, 8 probes.  Postfix's verify(8)
    stores the temporary result like a negative one and probes again only at
    address_verify_negative_refresh_time."""
    internal = CountingPeer(b"450 4.2.1 try again later")
    with trio_thread((internal.run,)) as (port,):
        d = daemon(relay_domains="corp.example", mynetworks="127.0.0.2/32",
                   smtpd_recipient_restrictions="reject_unauth_destination, reject_unverified_recipient",
                   address_verify_poll_delay="1s",
                   transport_maps=f"inline:{{ corp.example=smtp:[127.0.0.1]:{port} }}")
        codes = []
        with smtplib.SMTP("127.0.0.1", d.port, timeout=30) as client:
            client.ehlo("outside.example")
            assert client.mail("forged@outside.example")[0] == 250
            for _ in range(8):  # under smtpd_soft_error_limit
                codes.append(client.rcpt("someone@corp.example")[0])
        assert codes == [450] * 8
        assert internal.connections == 1, f"{internal.connections} probes for one address"
        assert_serving(d)


# -- 3. SMTPUTF8 mail never goes raw to a server that did not offer SMTPUTF8 -------


def _send_utf8(port: int, body: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.example")
        assert client.mail("alice@client.example", ["SMTPUTF8", "BODY=8BITMIME"])[0] == 250
        assert client.rcpt("bob@far.example")[0] == 250
        assert client.data(body)[0] == 250


def test_a_utf8_mime_part_header_needs_smtputf8_downstream(daemon):
    """Only the message's own header section (in the first content chunk) was looked
    at, so SMTPUTF8 mail whose UTF-8 header is in a MIME part (an attachment's
    file name) -- or past the first 1 MiB chunk when header_size_limit allows that --
    went raw to a server that offers 8BITMIME but not SMTPUTF8.  Postfix flags a
    UTF-8 header of any entity (cleanup_out_header) and bounces 5.6.7."""
    dest = ScriptedPeer(extensions=("PIPELINING", "8BITMIME"))  # no SMTPUTF8
    senders = ScriptedPeer()  # takes the DSN (sent with SMTPUTF8)
    part = (b"MIME-Version: 1.0\r\nSubject: plain\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n"
            b"--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
            b"--b\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Disposition: attachment; filename=\"r\xc3\xa9sum\xc3\xa9.pdf\"\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\nAAAA\r\n--b--\r\n")
    late = (b"Subject: plain\r\n" + b"X-Filler: " + b"x" * 900 + b"\r\n" + b"".join(
        b" " + b"y" * 1000 + b"\r\n" for _ in range(1200)) + b"X-Late: caf\xc3\xa9\r\n\r\nbody\r\n")
    with trio_thread((dest.run,), (senders.run,)) as (dest_port, senders_port):
        d = daemon(header_size_limit=str(2 * 1024 * 1024), transport_maps=f"inline:{{ far.example=smtp:[127.0.0.1]:{dest_port}, "
                                                          f"client.example=smtp:[127.0.0.1]:{senders_port} }}")
        _send_utf8(d.port, part)
        _send_utf8(d.port, late)
        wait_until(lambda: len(senders.received) + len(dest.received) >= 2, timeout=20)
        assert [r.data[:60] for r in dest.received] == []  # never sent without SMTPUTF8
        for dsn in senders.received:
            assert "Status: 5.6.7" in dsn.data.decode("utf-8")
        assert_serving(d)


# -- 4. the wire after conversion ----------------------------------------------------


def test_converted_content_is_dot_stuffed_and_decodes_to_what_was_sent(daemon):
    """Guard (passed before): quoted-printable made for a server without 8BITMIME puts
    a '.' at the start of a line after a soft break (73 columns then '.x'), and 8-bit
    lines past the converter's 64 KiB pieces; the wire stays dot-stuffed, no line is a
    lone '.', and the decoded body is byte for byte what the client sent."""
    import quopri

    plain = ScriptedPeer(extensions=("PIPELINING",))
    lines = [b"a" * 73 + b".x", b".\xff leading dot", b".", b"..", b"\xff" * 70_000 + b".end", b"tail. "]
    body = b"\r\n".join(lines) + b"\r\n"
    stuffed = b"".join(b"." + line + b"\r\n" if line.startswith(b".") else line + b"\r\n" for line in lines)
    message = (b"Subject: dots\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=latin1\r\n"
               b"Content-Transfer-Encoding: 8bit\r\n\r\n" + stuffed)
    with trio_thread((plain.run,)) as (port,):
        d = daemon(transport_maps=f"inline:{{ far.example=smtp:[127.0.0.1]:{port} }}")
        with smtplib.SMTP("127.0.0.1", d.port, timeout=30) as client:
            client.ehlo("client.example")
            assert client.mail("alice@client.example", ["BODY=8BITMIME"])[0] == 250
            assert client.rcpt("r@far.example")[0] == 250
            client.putcmd("DATA")
            assert client.getreply()[0] == 354
            client.send(message + b".\r\n")  # already stuffed: smtplib's data() would stuff again
            assert client.getreply()[0] == 250
        wait_until(lambda: plain.received, timeout=20)
        wire = plain.received[0].data
        assert wire.isascii()
        wire_lines = wire.split(b"\r\n")[:-1]
        assert all(len(line) <= 77 for line in wire_lines)  # 76 + a stuffing dot
        unstuffed = b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in wire_lines)
        assert all(line.startswith(b"..") or not line.startswith(b".") for line in wire_lines)
        encoded = unstuffed.split(b"\r\n\r\n", 1)[1]
        assert quopri.decodestring(encoded.replace(b"\r\n", b"\n")).replace(b"\n", b"\r\n") == body
        assert_serving(d)


# -- 5. guards: what an outsider cannot do --------------------------------------------


def _replies(port: int, commands: list[bytes]) -> list[bytes]:
    """Each command on one connection, and the first line of each reply."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        stream = sock.makefile("rb")
        out = [stream.readline()]
        for command in commands:
            sock.sendall(command + b"\r\n")
            lines = [stream.readline()]
            while lines[-1][3:4] == b"-":
                lines.append(stream.readline())
            out.append(lines[0])
    return out


def test_a_client_cannot_set_the_filter_or_forward_attributes(daemon):
    """Guard (passed before): the access-table FILTER is stored as the message
    parameter ``_FILTER``, which no ESMTP keyword can spell; FILTER= itself is an
    unknown parameter, and XCLIENT/XFORWARD do not exist."""
    d = daemon()
    got = _replies(d.port, [b"EHLO client.example",
                            b"MAIL FROM:<a@client.example> _FILTER=smtp:[127.0.0.1]:9",
                            b"MAIL FROM:<a@client.example> FILTER=smtp:[127.0.0.1]:9",
                            b"XCLIENT ADDR=127.0.0.2", b"XFORWARD ADDR=127.0.0.2",
                            b"MAIL FROM:<a@client.example>",
                            b"RCPT TO:<b@remote.example> _FILTER=smtp:[127.0.0.1]:9", b"QUIT"])
    assert [line[:3] for line in got] == [b"220", b"250", b"501", b"555", b"500", b"500", b"250", b"501", b"221"]
    assert_serving(d)


def test_an_outsider_cannot_make_verification_probes_to_outside_hosts(daemon):
    """Guard (passed before): smtpd_relay_restrictions run before
    smtpd_recipient_restrictions (Postfix), so with reject_unverified_recipient an
    outsider's RCPT for someone else's domain is refused without a probe, and no
    address form (%, !, quoted @, trailing dot) routes a probe outside."""
    internal = CountingPeer(b"250 2.1.5 Ok")
    with trio_thread((internal.run,)) as (port,):
        d = daemon(relay_domains="corp.example", mynetworks="127.0.0.2/32", alias_maps="",
                   smtpd_recipient_restrictions="reject_unverified_recipient",
                   transport_maps=f"inline:{{ corp.example=smtp:[127.0.0.1]:{port} }}")
        with smtplib.SMTP("127.0.0.1", d.port, timeout=30) as client:
            client.ehlo("outside.example")
            assert client.mail("forged@outside.example")[0] == 250
            for address in ["victim@outside.example", "victim%outside.example@localhost",
                            "outside.example!victim@localhost", "\"victim@outside.example\"@localhost",
                            "victim@outside.example.", "victim@[127.0.0.1]"]:
                assert client.rcpt(address)[0] in (450, 501, 550, 554), address
            assert client.rcpt("known@corp.example")[0] == 250
        assert internal.rcpts == [b"RCPT TO:<known@corp.example>"]
        assert_serving(d)


def test_verification_probes_the_address_that_would_be_delivered(daemon):
    """reject_unverified_recipient probed the RCPT argument as the client spelled it
    (cache key and probe RCPT), while the message goes to the resolver's address:
    ``v3@CORP.example.``, ``"v3"@corp.example`` and ``v3@corp.example`` are one
    mailbox, but made three probes, two of them for strings that are never delivered
    (a strict internal server may refuse the trailing dot and so 'verify' a real
    user as undeliverable).  Postfix's probe goes through cleanup, which
    canonicalises it: one probe, for the address that is delivered."""
    internal = CountingPeer(b"250 2.1.5 Ok")
    with trio_thread((internal.run,)) as (port,):
        d = daemon(relay_domains="corp.example", mynetworks="127.0.0.2/32",
                   smtpd_recipient_restrictions="reject_unverified_recipient",
                   transport_maps=f"inline:{{ corp.example=smtp:[127.0.0.1]:{port} }}")
        with smtplib.SMTP("127.0.0.1", d.port, timeout=30) as client:
            client.ehlo("outside.example")
            assert client.mail("someone@outside.example")[0] == 250
            for address in ["v3@CORP.example.", "\"v3\"@corp.example", "v3@corp.example"]:
                assert client.rcpt(address)[0] == 250, address
        assert len(internal.rcpts) == 1 and internal.rcpts[0].lower() == b"rcpt to:<v3@corp.example>", internal.rcpts
        assert_serving(d)


# -- 6. the AUTH dummy hash -----------------------------------------------------------


def test_a_password_entry_with_an_absurd_cost_does_not_stop_serve(daemon, tmp_path):
    """The unknown-user dummy hash copies the scrypt cost of the table's first entry;
    a cost hashlib refuses with TypeError (an N past 2**64, a typo in the table)
    escaped passwords.dummy_hash (it caught ValueError only), so serve died at start
    with a traceback (the same from reload).  Now the dummy falls back to the default
    cost: serve runs, bob's broken entry never matches, an unknown user gets 535."""
    import base64

    table = tmp_path / "sasl_passwd"
    table.write_text("bob:scrypt$100000000000000000000$8$1$c2FsdA==$aGFzaA==\n")
    d = daemon(smtpd_sasl_auth_enable="yes", smtpd_sasl_password_file=str(table),
               smtpd_tls_security_level="none", smtpd_tls_auth_only="no")
    for user in (b"alice", b"bob"):
        with smtplib.SMTP("127.0.0.1", d.port, timeout=30) as client:
            client.ehlo("client.example")
            code, _ = client.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0" + user + b"\0pw").decode())
            assert code == 535, user
    assert_serving(d)


# -- 7. FILTER where no message exists yet ----------------------------------------------


def test_filter_from_client_restrictions_without_delay_reject_is_not_dropped_silently(daemon):
    """With smtpd_delay_reject = no the client and HELO lists run before any mail
    transaction, so their FILTER, HOLD, DISCARD, REDIRECT and BCC results have no
    message to act on: Postfix skips them and logs a warning (not_in_client_helo).
    trimail dropped them without a word -- an operator's content filter bypassed
    for exactly the clients the table named, and nothing in the log."""
    d = daemon(smtpd_delay_reject="no", mynetworks="127.0.0.2/32", alias_maps="", local_recipient_maps="",
               smtpd_client_restrictions="check_client_access inline:{ {127.0.0.1=FILTER smtp:[127.0.0.1]:9} }")
    send(d.port, ["someone@localhost"])  # still accepted: the rest permits
    d.proc.wait_log(r"warning: access table inline:.*action FILTER is always skipped in client or helo "
                    r"restrictions", timeout=5)
    assert_serving(d)


# -- 8. the DATA reader past its chunk size ---------------------------------------------


def test_stray_ends_inside_lines_longer_than_the_readers_chunk_never_reach_the_wire(daemon):
    """Guard (passed before): a bare LF and a bare CR in the middle of lines longer
    than the DATA reader's FLUSH size (passed on in pieces), sent in TCP segments that
    end right on them, and a long line that starts with a dot: relayed with CRLF only,
    the LF a line end, the CR a space, the dot line stuffed once.  (Without
    smtp_line_length_limit, which would break these lines: tests/delivery has that.)"""
    import socket
    import time

    from tests.faults.test_wire import STRAY, RawPeer

    content = (b"Subject: long\r\n\r\n" + b"a" * 5000 + b"\n" + b"b" * 5000 + b"\r" + b"c" * 6000 + b"\r\n"
               + b".." + b"d" * 9000 + b"\r\n" + b"e" * 4095 + b"\r")
    segments = [content[:5017 + 17], content[5034:5034 + 5001], content[10035:]]  # end on \n, on \r
    assert b"".join(segments) == content
    with RawPeer() as peer:
        d = daemon(relayhost=f"[127.0.0.1]:{peer.port}", mynetworks="127.0.0.0/8", smtp_line_length_limit=0)
        with socket.create_connection(("127.0.0.1", d.port), timeout=10) as sock:
            stream = sock.makefile("rb")
            assert stream.readline().startswith(b"220")
            sock.sendall(b"EHLO client.example\r\nMAIL FROM:<a@client.example>\r\nRCPT TO:<b@remote.example>\r\n"
                         b"DATA\r\n")
            while not stream.readline().startswith(b"354"):
                pass
            for segment in segments:
                sock.sendall(segment)
                time.sleep(0.05)  # not synchronisation: only makes separate reads likely
            sock.sendall(b"\n.\r\n")
            assert stream.readline().startswith(b"250 ")
        wait_until(lambda: peer.messages, 15)
        relayed = peer.messages[0]
        assert not STRAY.search(relayed)
        assert relayed.endswith(b"\r\n\r\n" + b"a" * 5000 + b"\r\n" + b"b" * 5000 + b" " + b"c" * 6000 + b"\r\n"
                                + b".." + b"d" * 9000 + b"\r\n" + b"e" * 4095 + b"\r\n")
        assert_serving(d)


# -- 9. operator mistakes in restriction lists --------------------------------------------


def test_a_misplaced_restriction_stops_serve_at_start_with_one_line(tmp_path):
    """Guard (passed before): a restriction in a list that cannot see what it needs
    (reject_unverified_recipient in smtpd_data_restrictions; check_sender_access in
    the client list with smtpd_delay_reject = no) or without its argument ends serve
    at start with exit status 2 and one line naming file:line, not a traceback."""
    import subprocess
    import sys

    from tests.conftest import write_main_cf

    cases = [({"smtpd_data_restrictions": "reject_unverified_recipient"}, "cannot be used here"),
             ({"smtpd_client_restrictions": "check_sender_access inline:{a=OK}", "smtpd_delay_reject": "no"},
              "cannot be used here"),
             ({"smtpd_recipient_restrictions": "permit_dnswl_client"}, "needs an argument")]
    for number, (params, words) in enumerate(cases):
        directory = tmp_path / str(number)
        directory.mkdir()
        config = write_main_cf(directory, master_service_disable="", **params)
        done = subprocess.run([sys.executable, "-m", "trimail", "serve", "-c", str(config)], check=False,
                              capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 2, done.stderr
        lines = [line for line in done.stderr.splitlines() if "fatal" in line or "Traceback" in line]
        assert len(lines) == 1 and words in lines[0] and f"{config}, line " in lines[0], done.stderr


# -- 10. an unverified PTR name cannot open the relay ------------------------------------


def test_ok_from_check_reverse_client_hostname_access_does_not_open_the_relay(daemon):
    """check_reverse_client_hostname_access looks up the PTR name whether or not it
    verifies, so the name is whatever the owner of the client's address puts in its
    reverse zone.  An OK there (a table entry meant as an exception for a partner)
    permitted relaying for anyone who names their PTR after the partner: an open
    relay.  Postfix forbids it (forbid_allowlist: 'restriction ... returns OK ... not
    allowed for security reasons', 451 4.3.5 Server configuration error)."""
    from tests.dnsserver import run_dns_server

    zone = {"1.0.0.127.in-addr.arpa": {"PTR": ["mail.partner.example."]}}  # the client's own claim
    with trio_thread((run_dns_server, zone)) as (dns_port,):
        d = daemon(dns_nameservers=f"127.0.0.1:{dns_port}", mynetworks="127.0.0.2/32",
                   smtpd_relay_restrictions="check_reverse_client_hostname_access "
                                            "inline:{ mail.partner.example=OK }, reject_unauth_destination")
        with smtplib.SMTP("127.0.0.1", d.port, timeout=30) as client:
            client.ehlo("mail.partner.example")
            assert client.mail("someone@partner.example")[0] == 250
            code, text = client.rcpt("victim@outside.example")
        assert (code, text) == (451, b"4.3.5 Server configuration error")
        d.proc.wait_log(r"warning: restriction check_reverse_client_hostname_access returns OK for "
                        r"mail\.partner\.example", timeout=5)
        assert_serving(d)
