"""A hostile-client fuzzer against a live ``trimail serve`` (not only the machine).

tests/security/test_fuzz.py fuzzes the sans-IO protocol machine; this one runs a
real serve child and throws at it, through real sockets, what the Internet does:
random sequences from a vocabulary of valid and broken SMTP commands (BDAT,
AUTH, STARTTLS, SMTPUTF8, overlong addresses and lines, NULs, 8-bit bytes, bare
CR and LF), pipelined batches, message bodies and stray dots, TLS and TLS
garbage on the smtps port, several connections at once, and connections that
end with QUIT, a close or a reset (RST) at a random point.

After every example serve must be alive; at the end it must answer ``220`` and
take a message, the queue must pass ``PRAGMA integrity_check``, every message in
``trimail queue list --json`` must have recipients, every ``250 ... queued as
ID`` a fuzz client read must be in the queue, and the log must hold no traceback
and no contained failure (``... failed: ...``; a refused AUTH logs
``authentication failed``, which is expected).

Deterministic for CI: ``derandomize=True`` and no example database.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.faults.conftest import assert_serving, integrity_ok, send, trimail_cmd
from tests.faults.test_connections import listening_ports

COMMANDS = [
    b"EHLO client.example", b"HELO client.example", b"EHLO", b"HELO \xff\xfe", b"EHLO [127.0.0.1]",
    b"MAIL FROM:<alice@client.example>", b"MAIL FROM:<>", b"MAIL FROM:<alice@client.example> SIZE=99999999",
    b"MAIL FROM:<alice@client.example> BODY=8BITMIME SMTPUTF8", b"MAIL FROM:<\xc3\xa9l\xc3\xa8ve@client.example> SMTPUTF8",
    b"MAIL FROM:<alice@client.example> RET=HDRS ENVID=x+2By", b"MAIL FROM:<a@" + b"x" * 250 + b".example>",
    b"MAIL FROM:alice@client.example", b"MAIL FROM:<alice@client.example> FOO=BAR",
    b"RCPT TO:<bob@relay.example>", b"RCPT TO:<postmaster>", b"RCPT TO:<bob@[127.0.0.1]>",
    b"RCPT TO:<bob@relay.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob@relay.example",
    b"RCPT TO:<" + b"b" * 70 + b"@" + b"l" * 64 + b".example>", b"RCPT TO:<bob@xn--ls8h.example>",
    b"RCPT TO:<\xe2\x98\x83@relay.example>", b"RCPT TO:<@hop.example:bob@relay.example>", b"RCPT TO:<bob%x@relay.example>",
    b"DATA", b"BDAT 10 LAST", b"BDAT 0 LAST", b"BDAT x", b"RSET", b"NOOP", b"NOOP \x00", b"VRFY bob", b"EXPN staff",
    b"HELP", b"ETRN relay.example", b"STARTTLS", b"STARTTLS x", b"AUTH PLAIN AGFsaWNlAHdyb25n", b"AUTH PLAIN",
    b"AUTH LOGIN", b"AUTH LOGIN YWxpY2U=", b"AUTH CRAM-MD5", b"AUTH PLAIN ====", b"*", b"d3Jvbmc=",
    b"QUIT", b"GET / HTTP/1.0", b"CONNECT relay.example:25 HTTP/1.1", b".", b"..", b"Subject: fuzz",
    b"\x00", b"\xff\xfe\xfd", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",
]
ENDINGS = [b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b""]

line = st.builds(lambda command, end: command + end, st.sampled_from(COMMANDS), st.sampled_from(ENDINGS))
pipelined = st.lists(st.sampled_from(COMMANDS), min_size=2, max_size=8).map(lambda cs: b"\r\n".join(cs) + b"\r\n")
chunk = st.one_of(
    line, line, line, pipelined,
    st.binary(min_size=1, max_size=300),
    st.just(b"x" * 5000 + b"\r\n"),  # over line_length_limit
    st.just(b"y" * 70000),  # more than one read, no line end
    st.just(b"Subject: fuzz\r\n\r\nbody\r\n.\r\n"),
    st.just(b"From: a\r\n\r\n" + b"z" * 3000 + b"\r\n.\r\n"),  # over message_size_limit
    st.just(b"\r\n.\r\n"), st.just(b"\n.\n"), st.just(b"\r\n.\n"),
)


SKELETON = [b"EHLO client.example\r\n", b"MAIL FROM:<alice@client.example>\r\n", b"RCPT TO:<bob@relay.example>\r\n",
            b"DATA\r\n", b"Subject: fuzz\r\n\r\nbody\r\n.\r\n"]


@st.composite
def scripts(draw: st.DrawFn) -> list[bytes]:
    """Mostly a valid transaction (or two) with random edits, sometimes pure noise."""
    if draw(st.integers(0, 9)) < 2:
        return draw(st.lists(chunk, min_size=1, max_size=12))
    chunks = SKELETON * draw(st.integers(1, 2))
    for _ in range(draw(st.integers(0, 5))):
        at = draw(st.integers(0, len(chunks)))
        edit = draw(st.sampled_from(["insert", "replace", "delete", "split"]))
        if edit == "insert" or at == len(chunks):
            chunks = chunks[:at] + [draw(chunk)] + chunks[at:]
        elif edit == "replace":
            chunks = chunks[:at] + [draw(chunk)] + chunks[at + 1:]
        elif edit == "delete":
            chunks = chunks[:at] + chunks[at + 1:]
        else:  # the same bytes in two writes, cut anywhere
            cut = draw(st.integers(0, len(chunks[at])))
            chunks = chunks[:at] + [chunks[at][:cut], chunks[at][cut:]] + chunks[at + 1:]
    return [c for c in chunks if c] or [b"NOOP\r\n"]


@dataclass
class Plan:
    smtps: bool  # the implicit-TLS port
    tls: bool  # smtps: a real handshake (else the chunks are TLS garbage); port 25: STARTTLS first
    chunks: list[bytes]
    reads: list[bool]  # read what came back after this chunk
    ending: str  # "quit", "close" or "rst"
    cut: int  # the ending happens before this chunk


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    chunks = draw(scripts())
    return Plan(smtps=draw(st.booleans()), tls=draw(st.booleans()), chunks=chunks,
                reads=draw(st.lists(st.booleans(), min_size=len(chunks), max_size=len(chunks))),
                ending=draw(st.sampled_from(["quit", "quit", "close", "rst"])),
                cut=draw(st.integers(0, len(chunks))))


def reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass  # already closed (a failed TLS handshake closes it)
    sock.close()


def read_for(stream: socket.socket, seconds: float) -> bytes:
    """What arrives within *seconds* (until the peer closes)."""
    data = b""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        stream.settimeout(left)
        try:
            got = stream.recv(65536)
        except (TimeoutError, ssl.SSLWantReadError):
            break
        except (OSError, ssl.SSLError):
            break
        if not got:
            break
        data += got
    return data


def run(plan: Plan, smtp_port: int, smtps_port: int, tls: ssl.SSLContext) -> list[str]:
    """One fuzz connection; the queue IDs of the ``250`` replies it read."""
    try:
        sock = socket.create_connection(("127.0.0.1", smtps_port if plan.smtps else smtp_port), timeout=5)
    except ConnectionRefusedError:
        return []  # serve is gone: the example's assertion says so, with its log
    stream: socket.socket = sock
    received = b""
    try:
        if plan.smtps and plan.tls:
            stream = tls.wrap_socket(sock, server_hostname="mx.test.example")
        elif plan.tls:
            sock.sendall(b"EHLO client.example\r\nSTARTTLS\r\n")
            answer = b""
            while b"\n220 2.0.0 " not in answer and len(answer) < 4096:  # the STARTTLS reply
                got = sock.recv(4096)
                if not got:
                    break
                answer += got
            stream = tls.wrap_socket(sock, server_hostname="mx.test.example")
        for index, data in enumerate(plan.chunks):
            if index == plan.cut and plan.ending != "quit":
                break
            stream.sendall(data)
            if plan.reads[index]:
                received += read_for(stream, 0.02)
        if plan.ending == "quit":
            stream.sendall(b"QUIT\r\n")
            received += read_for(stream, 0.3)
    except (OSError, ssl.SSLError):
        pass  # serve closed on us (hard error limit, bare LF, forbidden command, TLS failure)
    finally:
        if plan.ending == "rst":
            reset(stream)  # the TLS socket took over the descriptor
        else:
            stream.close()
    return [m.decode() for m in re.findall(rb"250 2\.0\.0 Ok: queued as ([0-9A-Za-z]+)", received)]


def unexpected(log: list[str]) -> list[str]:
    return [line for line in log
            if "Traceback" in line or (" failed: " in line and "authentication failed:" not in line)]


def test_hostile_clients_cannot_hurt_the_live_daemon(daemon, cert, ca) -> None:
    d = daemon(smtpd_tls_cert_file=cert, smtps_listen="127.0.0.1:0", master_service_disable="qmgr",
               smtpd_sasl_auth_enable="yes", smtpd_tls_auth_only="no", smtpd_error_sleep_time="0s",
               smtpd_timeout="2s", smtpd_tls_handshake_timeout="2s", message_size_limit="2000",
               smtpd_recipient_limit="3")
    smtp_port, smtps_port = listening_ports(d)
    tls = ssl.create_default_context()
    ca.configure_trust(tls)
    acknowledged: list[str] = []
    pool = ThreadPoolExecutor(4)

    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck))
    @given(st.lists(plans(), min_size=1, max_size=4))
    def attack(connections: list[Plan]) -> None:
        for ids in pool.map(lambda plan: run(plan, smtp_port, smtps_port, tls), connections):
            acknowledged.extend(ids)
        assert d.alive, "serve exited:\n" + "\n".join(d.proc.log[-30:])
        assert not unexpected(d.proc.log), "\n".join(unexpected(d.proc.log))

    try:
        attack()
    finally:
        pool.shutdown()
    assert_serving(d)
    acknowledged.append(send(d.port, ["bob@relay.example"]))
    assert integrity_ok(d.queue_directory) == "ok"
    listed = trimail_cmd("queue", "list", "--json", "-c", str(d.config_path))
    assert listed.returncode == 0, listed.stderr
    queue = json.loads(listed.stdout)
    assert all(message["recipients"] for message in queue)
    assert set(acknowledged) <= {message["id"] for message in queue}
    assert not unexpected(d.proc.log)
