"""Red team 40: the DSN extension (RFC 3461) against a real serve, its peers a raw
SMTP sink that offers DSN and records every command line.

Addresses: serve on 127.0.103.1, the sinks on 127.0.103.2, the clients from 127.0.103.9.
"""

from __future__ import annotations

import email
import email.policy
import smtplib
import socketserver
import threading
from pathlib import Path

from tests.faults.conftest import banner, queued, wait_until

SERVE = "127.0.103.1"
SINK = "127.0.103.2"
CLIENT = "127.0.103.9"


class DsnSink:
    """A raw SMTP server offering DSN, 8BITMIME and SMTPUTF8 that takes everything and
    keeps each transaction: ``(MAIL line, RCPT lines, content)``."""

    def __init__(self, extensions: tuple[str, ...] = ("DSN", "8BITMIME", "SMTPUTF8"),
                 rcpt_reply: bytes = b"250 2.1.5 Ok") -> None:
        self.messages: list[tuple[bytes, list[bytes], bytes]] = []
        self.lock = threading.Lock()
        sink = self
        ehlo = b"250-sink.test\r\n" + b"".join(f"250-{e}\r\n".encode() for e in extensions[:-1]) \
            + f"250 {extensions[-1]}\r\n".encode()

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                self.wfile.write(b"220 sink.test ESMTP\r\n")
                mail, rcpts = b"", []
                while line := self.rfile.readline(1 << 16):
                    verb = line[:4].upper()
                    if verb == b"EHLO":
                        self.wfile.write(ehlo)
                    elif verb == b"MAIL":
                        mail, rcpts = line, []
                        self.wfile.write(b"250 2.1.0 Ok\r\n")
                    elif verb == b"RCPT":
                        rcpts.append(line)
                        self.wfile.write(rcpt_reply + b"\r\n")
                    elif verb == b"DATA":
                        self.wfile.write(b"354 go ahead\r\n")
                        content = bytearray()
                        while (data := self.rfile.readline(1 << 20)) not in (b"", b".\r\n"):
                            content += data
                        with sink.lock:
                            sink.messages.append((mail, rcpts, bytes(content)))
                        self.wfile.write(b"250 2.0.0 Ok: queued as SINK\r\n")
                    elif verb == b"QUIT":
                        self.wfile.write(b"221 2.0.0 Bye\r\n")
                        return
                    else:
                        self.wfile.write(b"250 2.0.0 Ok\r\n")

        class Server(socketserver.ThreadingTCPServer):
            allow_reuse_address = True
            daemon_threads = True

        self.server = Server((SINK, 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def taken(self) -> list[tuple[bytes, list[bytes], bytes]]:
        with self.lock:
            return list(self.messages)

    def notices(self) -> list[email.message.EmailMessage]:
        return [email.message_from_bytes(content, policy=email.policy.default)
                for mail, _, content in self.taken() if mail.startswith(b"MAIL FROM:<>")]

    def __enter__(self) -> DsnSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _client(port: int) -> smtplib.SMTP:
    client = smtplib.SMTP(SERVE, port, timeout=30, source_address=(CLIENT, 0))
    client.ehlo("client.example")
    return client


def _serve(daemon, sink: DsnSink, **params: object):
    return daemon(smtpd_listen=f"{SERVE}:0", relayhost=f"[{SINK}]:{sink.port}", mynetworks="127.0.103.0/24",
                  **params)


def _assert_serving(d) -> None:
    assert d.alive, "serve exited:\n" + "\n".join(d.proc.log[-30:])
    assert banner(d.port, SERVE).startswith("220 ")


def _report(notice: email.message.EmailMessage) -> list[email.message.Message]:
    """The per-message and per-recipient field groups of a notice's delivery-status part."""
    return list(list(notice.iter_parts())[1].get_payload())


# 1. NOTIFY=SUCCESS on a virtual alias: one RCPT to an alias of n addresses was copied
#    to each address with its NOTIFY=SUCCESS, so every next hop the alias reaches sent
#    the sender a success notice (n notices for one RCPT; each naming an address of the
#    alias), and where a next hop had no DSN trimail's own notice listed every address
#    of the alias.  Postfix's cleanup sends one "expanded" notice for the alias and
#    passes NOTIFY without SUCCESS (NEVER here) to the addresses (cleanup_out_recipient).

def test_notify_success_on_a_virtual_alias_is_one_expanded_notice_not_one_per_address(daemon, tmp_path: Path):
    members = [f"member{i}@dom{i}.example" for i in range(5)]
    virtual = tmp_path / "virtual"
    virtual.write_text(f"list@lists.example {', '.join(members)}\n")
    with DsnSink() as sink:
        d = _serve(daemon, sink, virtual_alias_maps=f"texthash:{virtual}")
        with _client(d.port) as client:
            assert client.mail("alice@client.example", ["ENVID=list-1"])[0] == 250
            assert client.rcpt("list@lists.example", ["NOTIFY=SUCCESS"])[0] == 250
            assert client.data(b"Subject: to the list\r\n\r\nbody\r\n")[0] == 250
        wait_until(lambda: any(m[0].startswith(b"MAIL FROM:<alice@") for m in sink.taken()), timeout=15)
        relayed = [line for mail, rcpts, _ in sink.taken() if mail.startswith(b"MAIL FROM:<alice@") for line in rcpts]
        assert len(relayed) == len(members), relayed
        asked = [line for line in relayed if b"SUCCESS" in line.upper()]
        assert not asked, f"{len(asked)} of {len(members)} next-hop recipients asked for a success notice: {asked}"
        assert all(b" NOTIFY=NEVER" in line for line in relayed), relayed
        wait_until(lambda: sink.notices() and queued(d.queue_directory) == 0, timeout=15)
        (notice,) = sink.notices()
        assert notice["Subject"] == "Successful Mail Delivery Report"
        fields = _report(notice)
        assert fields[0]["Original-Envelope-Id"] == "list-1"
        assert [(f["Final-Recipient"], f["Action"]) for f in fields[1:]] == [("rfc822; list@lists.example", "expanded")]
        assert not any(member.encode() in notice.as_bytes() for member in members)
        _assert_serving(d)


# 2. An ORCPT is passed on in xtext's own form (RFC 3461 5.2.1), which may be longer
#    than what the client sent: a raw "=" becomes "+3D", a raw UTF-8 character of a
#    utf-8 ORCPT "\x{4E2D}".  serve took ORCPTs of up to 500 characters as sent, so
#    one it took could leave 1,539 characters long ("=" x 490), and a next hop that
#    holds RFC 3461's 500 (trimail itself) refused it, 501 5.5.4: the recipient
#    bounced (measured trimail to trimail with a utf-8 ORCPT of 221 characters, 1,622
#    on the wire).  Now the form passed on must fit in 500 characters too, else the
#    RCPT is refused as Postfix refuses a bad ORCPT.

def test_every_orcpt_serve_takes_reaches_the_next_hop_in_at_most_500_characters(daemon):
    orcpts = {"equals": "rfc822;" + "x=" * 160 + "@example.com",  # 335 as sent, 659 passed on
              "han": "utf-8;" + "\u4e2d" * 100 + "@example.com",  # 118 as sent, 818 passed on
              "plain": "rfc822;plain+2Bextension@example.com"}
    with DsnSink() as sink:
        d = _serve(daemon, sink)
        with _client(d.port) as client:
            assert client.mail("alice@client.example", ["SMTPUTF8"])[0] == 250
            taken = {name for name, orcpt in orcpts.items()
                     if client.rcpt(f"{name}@dest.example", ["NOTIFY=FAILURE", f"ORCPT={orcpt}"])[0] == 250}
            assert "plain" in taken
            assert client.data(b"Subject: orcpt\r\n\r\nbody\r\n")[0] == 250
        wait_until(lambda: sink.taken() and queued(d.queue_directory) == 0, timeout=15)
        (relayed,) = [rcpts for mail, rcpts, _ in sink.taken() if mail.startswith(b"MAIL FROM:<alice@")]
        passed = {line.split(b"<", 1)[1].split(b"@", 1)[0].decode():
                  line.split(b" ORCPT=", 1)[1].rstrip(b"\r\n") for line in relayed}
        assert set(passed) == taken
        long = {name: len(value) for name, value in passed.items() if len(value) > 500}
        assert not long, f"ORCPTs taken and passed on longer than RFC 3461's 500 characters: {long}"
        assert passed["plain"] == b"rfc822;plain+2Bextension@example.com"
        _assert_serving(d)


# 3. The parsed _DSN_RCPT of a message (each recipient's NOTIFY and ORCPT) was kept by
#    an lru_cache of 256 texts in every process that reads it (the qmgr worker): after
#    256 messages of 1,000 recipients with ORCPTs of 500 characters (0.56 MB of JSON
#    each, 0.88 MB parsed), about 370 MB stayed alive long after the messages had gone.
#    Now what is kept is bounded by its length (notify.CACHE_TEXT characters).

def test_the_parsed_dsn_requests_of_gone_messages_are_not_kept_without_bound():
    import gc
    import tracemalloc

    from trimail.delivery import notify

    def params(n: int) -> dict[str, str | None]:
        stored: dict[str, str | None] = {}
        notify.store(stored, {f"r{i}@m{n}.example": {"NOTIFY": "SUCCESS,FAILURE",
                                                    "ORCPT": f"rfc822;{'x' * 470}{i}@m{n}.example"}
                              for i in range(1000)})
        return stored

    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(120):  # each message read as the qmgr reads it, then gone
            message = params(n)
            assert notify.orcpt_of(message, f"r7@m{n}.example") == ("rfc822", f"{'x' * 470}7@m{n}.example")
            assert notify.wants(message, f"r8@m{n}.example", "SUCCESS")
            del message
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 48 << 20, f"{kept / 1e6:.0f} MB kept for 120 messages that are gone"


# 4. A success notice was queued with each delivery job's record, so a message made as
#    many notices as it had jobs: local(8) delivers each recipient on its own, so one
#    message from the Internet to 50 local users with NOTIFY=SUCCESS sent 50 notices to
#    its (forged) sender, one per RCPT line (1,000 with smtpd_recipient_limit's default),
#    and 120 relayed recipients 3 (one per 50).  Postfix 3.7 sends one for the message
#    (its qmgr flushes the message's trace when its round is done: 1 notice for 120
#    relayed recipients, measured).  Now a recipient owed a notice says so in its
#    record, and the message's last job queues one notice for all of them.

def test_one_message_to_many_local_users_with_notify_success_is_one_notice(daemon, tmp_path: Path):
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o1777)
    spool.chmod(0o1777)
    users = [f"root+{n}@mx.test.example" for n in range(30)]
    with DsnSink() as sink:
        d = _serve(daemon, sink, mydestination="mx.test.example", alias_maps="", local_recipient_maps="",
                   recipient_delimiter="+", mail_spool_directory=str(spool), home_mailbox="")
        with _client(d.port) as client:
            assert client.mail("victim@client.example", ["ENVID=forged"])[0] == 250
            for user in users:
                assert client.rcpt(user, ["NOTIFY=SUCCESS"])[0] == 250
            assert client.data(b"Subject: to everyone\r\n\r\nbody\r\n")[0] == 250
        wait_until(lambda: sink.notices() and queued(d.queue_directory) == 0, timeout=15)
        notices = sink.notices()
        assert len(notices) == 1, f"{len(notices)} success notices for one message"
        reported = [(f["Final-Recipient"], f["Action"]) for f in _report(notices[0])[1:]]
        assert sorted(reported) == sorted((f"rfc822; {user}", "delivered") for user in users)
        _assert_serving(d)


# 5. The same through sendmail: ``-N success`` is one NOTIFY for every recipient, so
#    each address virtual_alias_maps made of one recipient got NOTIFY=SUCCESS too (3
#    next-hop RCPTs with SUCCESS for an alias of 3).  Now the submission's expansion
#    does what cleanup does for SMTP mail.

def test_sendmail_N_success_to_a_virtual_alias_is_one_expanded_notice(daemon, tmp_path: Path):
    from tests.local.test_sendmail import sendmail

    members = ["a@x.example", "b@y.example", "c@z.example"]
    virtual = tmp_path / "virtual"
    virtual.write_text(f"list@lists.example {', '.join(members)}\n")
    with DsnSink() as sink:
        d = _serve(daemon, sink, virtual_alias_maps=f"texthash:{virtual}")
        done = sendmail(d.config_path, "-N", "success,failure", "-V", "local-1", "-f", "alice@client.example",
                        "list@lists.example", "direct@w.example", data=b"Subject: from sendmail\n\nbody\n")
        assert done.returncode == 0, done.stderr
        wait_until(lambda: any(m[0].startswith(b"MAIL FROM:<alice@") for m in sink.taken()), timeout=15)
        relayed = sorted(line for mail, rcpts, _ in sink.taken() if mail.startswith(b"MAIL FROM:<alice@")
                         for line in rcpts)
        assert relayed == sorted([f"RCPT TO:<{m}> NOTIFY=FAILURE\r\n".encode() for m in members]
                                 + [b"RCPT TO:<direct@w.example> NOTIFY=SUCCESS,FAILURE\r\n"]), relayed
        wait_until(lambda: sink.notices() and queued(d.queue_directory) == 0, timeout=15)
        (notice,) = sink.notices()
        fields = _report(notice)
        assert fields[0]["Original-Envelope-Id"] == "local-1"
        assert [(f["Final-Recipient"], f["Action"]) for f in fields[1:]] == [("rfc822; list@lists.example", "expanded")]
        _assert_serving(d)
