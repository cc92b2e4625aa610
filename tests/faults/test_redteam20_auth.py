"""Red team of the mail authentication checks (issue 20) against a real ``trimail
serve`` child process: what a stranger's DNS zone and a stranger's message can make
the SPF, DKIM and DMARC checks do.  The rule (STYLE.md section 0): nothing outside
one session ends or stalls the daemon, and one message's checks cost bounded time
and memory.

Loopback addresses of this module: serve on 127.0.61.5, the DNS server on
127.0.61.6, clients 127.0.61.20 .. .29 (outside mynetworks; 127.0.61.10 is
mynetworks)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import queue
import random
import smtplib
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import dkim
import pytest
import trio

from tests.authcheck.keys import txt
from tests.dnsserver import run_dns_server
from tests.faults.conftest import banner
from trimail.authcheck.signing import generate_key, public_record
from trimail.milter import protocol as p
from trimail.queue.store import Store

SERVE = "127.0.61.5"
DNS = "127.0.61.6"
CLIENT = "127.0.61.20"
SIGNING_PEM = generate_key("rsa", 1024)
MESSAGE = (b"From: Alice <alice@sender.example>\r\nTo: bob@rcpt.example\r\nSubject: hello\r\n"
           b"Date: Wed, 02 Dec 2026 10:00:00 +0000\r\nMessage-ID: <1@sender.example>\r\n\r\n"
           b"Hello Bob.\r\n")


@contextlib.contextmanager
def dns_server(zone: dict) -> Iterator[int]:
    """tests/dnsserver.py's server answering *zone* on DNS, in a thread of its own
    (the test drives a serve child process, not a trio run); yields its port."""
    started: queue.Queue = queue.Queue()
    stop = threading.Event()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            started.put(await nursery.start(run_dns_server, zone, DNS))
            await trio.to_thread.run_sync(stop.wait)
            nursery.cancel_scope.cancel()

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    try:
        yield started.get(timeout=10)
    finally:
        stop.set()
        thread.join(10)


def start(daemon, dns_port: int, **params: object):
    settings: dict[str, object] = {
        "smtpd_listen": f"{SERVE}:0", "dns_nameservers": f"{DNS}:{dns_port}", "mynetworks": "127.0.61.10/32",
        "relay_domains": "rcpt.example", "smtpd_peername_lookup": "no", "smtpd_workers": "0",
        "master_service_disable": "qmgr"}
    settings.update(params)
    return daemon(**settings)


def send(port: int, message: bytes, sender: str = "bounce@sender.example") -> tuple[int, bytes]:
    """The reply to MAIL FROM when refused, else to the end of DATA."""
    with smtplib.SMTP(SERVE, port, local_hostname="helo.example", timeout=60, source_address=(CLIENT, 0)) as smtp:
        smtp.ehlo()
        reply = smtp.mail(sender)
        if reply[0] != 250:
            return reply
        assert smtp.rcpt("bob@rcpt.example")[0] == 250
        return smtp.data(message)


def assert_serving(serve) -> None:
    assert serve.alive, "serve exited:\n" + "\n".join(serve.proc.log[-30:])
    greeting = banner(serve.port, SERVE)
    assert greeting.startswith("220 "), greeting


def last_queued(queue_directory) -> bytes:
    store = Store.open(queue_directory, readonly=True)
    try:
        return store.read_content(store.list_messages()[0].id)
    finally:
        store.close()


def auth_results(content: bytes) -> str:
    head = content.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace").replace("\r\n\t", " ").replace("\r\n ", " ")
    return "\n".join(line for line in head.split("\r\n") if line.lower().startswith("authentication-results:"))


def sign(message: bytes, selector: bytes, domain: bytes = b"sender.example") -> bytes:
    return dkim.sign(message, selector, domain, SIGNING_PEM) + message


def _der_length(length: int) -> bytes:
    if length < 128:
        return bytes([length])
    octets = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(octets)]) + octets


def _der_integer(value: int) -> bytes:
    octets = value.to_bytes(value.bit_length() // 8 + 1, "big")
    return b"\x02" + _der_length(len(octets)) + octets


def rsa_public_key(modulus_bits: int, exponent_bits: int) -> str:
    """A DKIM key record of a (made up) RSA key: an RSAPublicKey of the given sizes."""
    rng = random.Random(modulus_bits * 7 + exponent_bits)
    modulus = rng.getrandbits(modulus_bits) | 1 | (1 << (modulus_bits - 1))
    exponent = rng.getrandbits(exponent_bits) | 1 | (1 << (exponent_bits - 1))
    body = _der_integer(modulus) + _der_integer(exponent)
    der = b"\x30" + _der_length(len(body)) + body
    return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()


class Probe:
    """Greetings of fresh connections, one after another, while something runs:
    the longest wait for a 220 is how long serve stood still."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.worst = 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            began = time.monotonic()
            try:
                banner(self.port, SERVE, timeout=15)
            except OSError:
                pass
            self.worst = max(self.worst, time.monotonic() - began)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(20)


def test_a_dkim_key_with_a_huge_exponent_stalls_no_one(daemon):
    """dkimpy checks RSA in pure Python: pow(signature, e, n) with the key record's
    e and n, one C call holding the GIL.  A 16384-bit modulus with a 16384-bit
    exponent costs about 9 s of CPU per signature, and the event loop stood still
    all along: every other session of the daemon waited (several signatures, a
    bigger key: minutes).  Such a key is now a permerror before any arithmetic
    (OpenSSL's limits: modulus at most 16384 bits, exponent at most 64 bits)."""
    record = rsa_public_key(16384, 16384)
    zone = {"sender.example": {"TXT": [txt("v=spf1 -all")]},
            "s1._domainkey.sender.example": {"TXT": [txt(record)]},
            "s2._domainkey.sender.example": {"TXT": [txt(record)]}}
    message = sign(sign(MESSAGE, b"s1"), b"s2")
    with dns_server(zone) as dns_port:
        serve = start(daemon, dns_port, smtpd_authentication_timeout="3s")
        outcome: list = []
        sender = threading.Thread(target=lambda: outcome.append((send(serve.port, message), time.monotonic())))
        began = time.monotonic()
        with Probe(serve.port) as probe:
            sender.start()
            sender.join(60)
        assert outcome, "no reply to the message"
        (code, text), ended = outcome[0]
        assert code == 250, text
        assert ended - began < 6, f"the message took {ended - began:.1f} s (budget 3 s)"
        assert probe.worst < 1.5, f"a new client waited {probe.worst:.1f} s for its greeting"
        assert_serving(serve)
        results = auth_results(last_queued(serve.queue_directory))
        assert "dkim=permerror" in results and "dkim=pass" not in results, results


def serve_cpu(serve) -> float:
    """CPU seconds serve has used so far (user + system, from /proc)."""
    fields = Path(f"/proc/{serve.proc.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_signature_naming_thousands_of_fields_costs_little_cpu(daemon):
    """dkimpy finds each h= name by scanning the header section from the bottom: a
    signature naming 7,000 fields over 9,000 header fields (86 kB, under
    header_size_limit) cost 4 s of CPU: about 50 microseconds per byte a stranger
    sends, and a few such messages at once took every core.  A signature naming
    more than MAX_SIGNED_FIELDS fields is now a permerror before the scan."""
    zone = {"sender.example": {"TXT": [txt("v=spf1 -all")]},
            "s._domainkey.sender.example": {"TXT": [txt(public_record(SIGNING_PEM))]}}
    body = b"Hello Bob.\r\n"
    names = b":".join(b"h%d" % i for i in range(7000))
    signature = (b"DKIM-Signature: v=1; a=rsa-sha256; c=simple/simple; d=sender.example; s=s; bh="
                 + base64.b64encode(hashlib.sha256(body).digest()) + b"; h=" + names + b"; b=AAAA\r\n")
    message = MESSAGE.replace(b"\r\n\r\n", b"\r\n" + b"".join(b"a:%d\r\n" % (i % 10) for i in range(9000))
                              + signature + b"\r\n", 1)
    assert len(message) < 102400  # header_size_limit
    with dns_server(zone) as dns_port:
        serve = start(daemon, dns_port, smtpd_authentication_timeout="8s")
        cpu = serve_cpu(serve)
        began = time.monotonic()
        code, text = send(serve.port, message)
        took = time.monotonic() - began
        assert code == 250, text
        assert took < 2, f"the message took {took:.1f} s"
        assert serve_cpu(serve) - cpu < 2
        assert_serving(serve)
        results = auth_results(last_queued(serve.queue_directory))
        assert "dkim=permerror" in results, results


def test_a_from_field_after_64_kb_of_header_does_not_escape_dmarc(daemon):
    """DMARC read the From: domain from the header the session keeps for Message-ID
    and the hop count: its first 64 kB only.  A spoofed From: placed after 64 kB of
    padding (still under header_size_limit) was "not exactly one From: address",
    dmarc=permerror, and smtpd_dmarc_reject let the forgery of a p=reject domain
    through.  The From: is now read from the whole header section."""
    zone = {"sender.example": {"TXT": [txt("v=spf1 -all")]},
            "_dmarc.sender.example": {"TXT": [txt("v=DMARC1; p=reject")]}}
    padding = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"x" * 60) for i in range(1000))
    assert 64 * 1024 < len(padding) < 90 * 1024
    spoof = padding + MESSAGE
    with dns_server(zone) as dns_port:
        serve = start(daemon, dns_port, smtpd_dmarc_reject="yes")
        code, text = send(serve.port, spoof, sender="bounce@evil.example")
        assert (code, text[:5]) == (550, b"5.7.1"), (code, text)
        assert b"sender.example" in text
        assert_serving(serve)


def test_an_spf_record_of_macros_does_not_freeze_the_event_loop(daemon):
    """An expanded SPF name over 253 octets loses labels on the left; that was a loop
    copying the rest of the name for each label dropped, in the event loop at MAIL
    FROM.  "exists:%{h}%{h}..." with a HELO name of 125 labels expands to
    megabytes with a dot every other byte: seconds for 16 kB of record, minutes
    for a 64 kB one, and the time budget (a cancel scope) cannot interrupt code
    that never awaits.  Now one cut, linear."""
    helo = ".".join(["a"] * 120) + ".example"
    record = "v=spf1 exists:" + "%{h}" * 4000 + ".example -all"
    zone = {"sender.example": {"TXT": [txt(record)]}}
    with dns_server(zone) as dns_port:
        serve = start(daemon, dns_port, smtpd_authentication_timeout="3s")
        outcome: list = []

        def mail() -> None:
            with smtplib.SMTP(SERVE, serve.port, local_hostname=helo, timeout=60,
                              source_address=(CLIENT, 0)) as smtp:
                smtp.ehlo()
                began = time.monotonic()
                reply = smtp.mail("bounce@sender.example")
                outcome.append((reply, time.monotonic() - began))

        sender = threading.Thread(target=mail)
        with Probe(serve.port) as probe:
            sender.start()
            sender.join(60)
        assert outcome, "no reply to MAIL FROM"
        (code, text), took = outcome[0]
        assert code == 250, text
        assert took < 2, f"MAIL FROM took {took:.1f} s"
        assert probe.worst < 1.5, f"a new client waited {probe.worst:.1f} s for its greeting"
        assert_serving(serve)


def event_loop_cpu(serve) -> float:
    """CPU seconds of serve's main thread: its trio event loop (worker threads,
    where DKIM hashing belongs, are other tasks of the process)."""
    pid = serve.proc.proc.pid
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_big_unsigned_message_does_not_hold_the_event_loop(daemon):
    """Listing a message's DKIM signatures ran dkimpy's parser on the whole message
    in the event loop, for every message from outside, signed or not: splitting a
    9 MB body into lines held every session of the daemon 0.5 to 0.6 s (the rest
    of receiving it: 0.05 s).  Only the header section is parsed now."""
    zone = {"sender.example": {"TXT": [txt("v=spf1 -all")]}}
    message = MESSAGE + b"a\r\n" * 3_000_000
    with dns_server(zone) as dns_port:
        serve = start(daemon, dns_port)
        spent = []
        for _ in range(2):
            cpu = event_loop_cpu(serve)
            code, text = send(serve.port, message)
            assert code == 250, text
            spent.append(event_loop_cpu(serve) - cpu)
        assert min(spent) < 0.3, f"the event loop spent {spent} s on each message"
        assert_serving(serve)
        assert "dkim=none" in auth_results(last_queued(serve.queue_directory))


MILTER = "127.0.61.7"


class StreamingMilter:
    """A milter (raw sockets, a thread) that says "continue" to everything and, at
    the end of the message, sends *frames* modification replies made by *make(n)*
    as fast as trimail reads them, then accepts; counts the bytes it got out."""

    def __init__(self, make, frames: int, protocol: int = 0) -> None:
        self.make = make
        self.protocol = protocol
        self.frames = frames
        self.sent = 0
        self.listener = socket.create_server((MILTER, 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def name(self) -> str:
        return f"inet:{MILTER}:{self.port}"

    def _run(self) -> None:
        conn, _ = self.listener.accept()
        reader = p.FrameReader()
        with conn:
            try:
                while True:
                    frame = reader.next_frame()
                    if frame is None:
                        data = conn.recv(65536)
                        if not data:
                            return
                        reader.receive_data(data)
                        continue
                    command, _ = frame
                    if command == p.SMFIC_OPTNEG:
                        conn.sendall(p.frame(p.SMFIC_OPTNEG, struct.pack(">III", 6, p.ALL_ACTIONS, self.protocol)))
                    elif command in (p.SMFIC_MACRO, p.SMFIC_ABORT):
                        continue
                    elif command == p.SMFIC_QUIT:
                        return
                    elif command == p.SMFIC_BODYEOB:
                        for n in range(self.frames):
                            data = self.make(n)
                            conn.sendall(data)
                            self.sent += len(data)
                        conn.sendall(p.frame(p.SMFIR_ACCEPT))
                    else:
                        conn.sendall(p.frame(p.SMFIR_CONTINUE))
            except OSError:  # trimail closed the connection: what it had enough of
                return

    def close(self) -> None:
        self.listener.close()
        self.thread.join(30)


def peak_memory(serve) -> int:
    """serve's peak resident set (VmHWM) in bytes."""
    for line in Path(f"/proc/{serve.proc.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_a_milter_streaming_a_replacement_body_is_cut_off(daemon, tmp_path):
    """At the end of the message the milter client kept every modification reply in
    a list until the filter's decision came, and only then wrote a replaced body to
    a spool and checked it against message_size_limit: a filter that streams
    SMFIR_REPLBODY (each frame under the 1 MiB frame limit, the timeout counted per
    frame) grew serve by whatever it sent (here 300 MB; nothing stopped 30 GB, and
    the kernel's OOM killer ends the whole daemon).  The modifications of one
    message are now bounded (message_size_limit + header_size_limit + 1 MiB), and a
    filter that sends more has failed: milter_default_action (tempfail)."""
    chunk = p.frame(p.SMFIR_REPLBODY, b"x" * ((1 << 20) - 3) + b"\r\n")
    milter = StreamingMilter(lambda n: chunk, 300)
    try:
        with dns_server({}) as dns_port:
            serve = start(daemon, dns_port, smtpd_milters=milter.name, smtpd_authentication_checks="")
            before = peak_memory(serve)
            code, text = send(serve.port, MESSAGE)
            grown = peak_memory(serve) - before
            assert (code, text[:5]) == (451, b"4.7.1"), (code, text)
            assert milter.sent < 40 << 20, f"the milter got {milter.sent >> 20} MiB in"
            assert grown < 100 << 20, f"serve grew by {grown >> 20} MiB"
            milter.close()  # the next session's filter is down: its greeting at once
            assert_serving(serve)
    finally:
        milter.close()


def test_a_milter_changing_absent_headers_does_not_hold_the_event_loop(daemon):
    """Each SMFIR_CHGHEADER scans the header fields for the name's instances: 1,000
    of them (index 2**31, a name the message does not have) against the 20,000
    fields of a 100 kB header cost 1.3 s, in the event loop, where every session
    of the daemon waited.  The edits are made in a worker thread now."""
    change = p.frame(p.SMFIR_CHGHEADER, struct.pack(">I", 2**31) + b"X-Absent\0\0")
    milter = StreamingMilter(lambda n: change, 1000, protocol=p.SMFIP_NOHDRS | p.SMFIP_NOBODY)
    message = MESSAGE.replace(b"\r\n\r\n", b"\r\n" + b"".join(
        b"a:%d\r\n" % (i % 10) for i in range(19000)) + b"\r\n", 1)
    assert len(message) < 102400  # header_size_limit
    try:
        with dns_server({}) as dns_port:
            serve = start(daemon, dns_port, smtpd_milters=milter.name, smtpd_authentication_checks="")
            cpu = event_loop_cpu(serve)
            code, text = send(serve.port, message)
            spent = event_loop_cpu(serve) - cpu
            assert code == 250, text
            assert spent < 0.6, f"the event loop spent {spent:.2f} s on the message"
            milter.close()
            assert_serving(serve)
    finally:
        milter.close()


@pytest.mark.parametrize("command", [p.SMFIR_ADDRCPT, p.SMFIR_CHGFROM])
def test_a_milter_address_with_cr_lf_is_refused(daemon, command):
    """An address a filter adds (SMFIR_ADDRCPT) or puts as the sender (SMFIR_CHGFROM)
    went into the queue as it came, CR LF included: a recipient the SMTP client
    refuses to format at every delivery attempt (it would write "RCPT TO:<a>" and a
    command of the filter's choosing).  Such an edit cannot be made: the filter has
    failed, milter_default_action answers (tempfail), nothing is queued."""
    edit = p.frame(command, b"<evil@rcpt.example>\r\nRCPT TO:<other@rcpt.example>\0")
    milter = StreamingMilter(lambda n: edit, 1, protocol=p.SMFIP_NOHDRS | p.SMFIP_NOBODY)
    try:
        with dns_server({}) as dns_port:
            serve = start(daemon, dns_port, smtpd_milters=milter.name, smtpd_authentication_checks="")
            code, text = send(serve.port, MESSAGE)
            assert (code, text[:5]) == (451, b"4.7.1"), (code, text)
            milter.close()
            assert_serving(serve)
            store = Store.open(serve.queue_directory, readonly=True)
            try:
                assert store.list_messages() == []
            finally:
                store.close()
    finally:
        milter.close()


def test_a_signature_with_a_huge_b_value_costs_little_cpu(daemon):
    """dkimpy turns b= into an integer one byte at a time, each step copying the
    integer so far: a 93 kB b= (under header_size_limit) cost 0.75 s of CPU before
    the arithmetic even began.  No key of ours (16384 bits at most) makes a
    signature longer than 2,048 bytes: a longer b= is a permerror at once."""
    zone = {"sender.example": {"TXT": [txt("v=spf1 -all")]},
            "s._domainkey.sender.example": {"TXT": [txt(public_record(SIGNING_PEM))]}}
    signature = dkim.sign(MESSAGE, b"s", b"sender.example", SIGNING_PEM)
    huge = b"b=" + base64.b64encode(b"\x01" * 70000) + b"\r\n"
    message = signature[:signature.rindex(b"b=")] + huge + MESSAGE
    assert len(message) < 102400  # header_size_limit
    with dns_server(zone) as dns_port:
        serve = start(daemon, dns_port)
        spent = []
        for _ in range(2):
            cpu = serve_cpu(serve)
            code, text = send(serve.port, message)
            assert code == 250, text
            spent.append(serve_cpu(serve) - cpu)
        assert min(spent) < 0.3, f"serve spent {spent} s of CPU on each message"
        assert_serving(serve)
        assert "dkim=permerror" in auth_results(last_queued(serve.queue_directory))
