"""Input abuse and smuggling over real sockets: slow clients, floods, early talkers, NULs, long lines."""

from __future__ import annotations

import socket
import time

import trio

from tests.delivery.test_delivery import wait_empty
from tests.peers import Sink
from trimail.queue.store import Store


def read_all(sock: socket.socket) -> bytes:
    got = b""
    while chunk := sock.recv(4096):
        got += chunk
    return got


async def test_slow_byte_client_is_cut_off_at_the_session_deadline(start_mta):
    srv = await start_mta(master_service_disable="qmgr", smtpd_timeout="30s", smtpd_session_deadline="2s")

    def trickle() -> tuple[bytes, float]:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", srv.addresses[0].port), timeout=30) as sock:
            sock.recv(1024)
            sock.settimeout(0.3)
            got = b""
            for byte in b"NOOP" * 100:  # one byte at a time, well inside smtpd_timeout
                try:
                    sock.send(bytes([byte]))
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    got += chunk
                except socket.timeout:
                    continue
                except OSError:
                    break
        return got, time.monotonic() - started

    got, elapsed = await trio.to_thread.run_sync(trickle)
    assert b"421 4.4.2 mx.test.example Error: session time limit exceeded" in got
    assert elapsed < 20


async def test_connection_rate_limit_per_client(start_mta):
    srv = await start_mta(master_service_disable="qmgr", smtpd_client_connection_rate_limit="3")

    def connect() -> bytes:
        with socket.create_connection(("127.0.0.1", srv.addresses[0].port), timeout=30) as sock:
            greeting = sock.recv(1024)
            if greeting.startswith(b"220"):
                sock.sendall(b"QUIT\r\n")
            return greeting

    greetings = [(await trio.to_thread.run_sync(connect))[:3] for _ in range(5)]
    assert greetings == [b"220", b"220", b"220", b"421", b"421"]


async def test_client_talking_before_the_greeting_is_refused(start_mta):
    srv = await start_mta(master_service_disable="qmgr", smtpd_greet_pause="1s")

    def early() -> bytes:
        with socket.create_connection(("127.0.0.1", srv.addresses[0].port), timeout=30) as sock:
            sock.sendall(b"EHLO hasty.example\r\nMAIL FROM:<a@b.example>\r\n")
            return read_all(sock)

    def polite() -> bytes:
        with socket.create_connection(("127.0.0.1", srv.addresses[0].port), timeout=30) as sock:
            banner = sock.recv(1024)
            sock.sendall(b"QUIT\r\n")
            return banner + read_all(sock)

    assert (await trio.to_thread.run_sync(early)).startswith(b"554 5.5.1 Error: SMTP protocol synchronization")
    assert (await trio.to_thread.run_sync(polite)).startswith(b"220 ")


async def test_nul_and_overlong_lines_and_control_characters(start_mta):
    srv = await start_mta(master_service_disable="qmgr")

    def abuse() -> list[bytes]:
        with socket.create_connection(("127.0.0.1", srv.addresses[0].port), timeout=30) as sock:
            sock.recv(1024)
            sock.sendall(b"EHLO x.example\r\n"
                         b"MAIL FROM:<a\x00b@client.example>\r\n"
                         b"MAIL FROM:<a@client.example> " + b"X" * 5000 + b"\r\n"
                         b"MAIL FROM:<a\x01@client.example>\r\n"
                         b"MAIL FROM:<a@client.example>\r\n"
                         b"RCPT TO:<b@far.example\rRCPT TO:<c@evil.example>>\r\n"
                         b"QUIT\r\n")
            return [line for line in read_all(sock).split(b"\r\n") if line[3:4] == b" "]

    lines = await trio.to_thread.run_sync(abuse)
    assert lines[1] == b"500 5.5.2 Error: NUL character in command"
    assert lines[2] == b"500 5.5.2 Error: line too long"
    assert lines[3] == b"501 5.1.7 Bad sender address syntax"
    assert lines[4].startswith(b"250 2.1.0")
    assert lines[5].startswith(b"501 5.")  # a CR inside the address: refused, never split
    assert lines[6].startswith(b"221")


async def test_smuggling_through_trimail_delivers_one_message_with_clean_line_ends(start_mta):
    with Sink() as sink:
        srv = await start_mta(relayhost=f"[127.0.0.1]:{sink.port}")
        smuggled = ("Subject: innocent\r\n\r\nhello\n.\nMAIL FROM:<evil@attacker.example>\n"
                    "RCPT TO:<victim@far.example>\nDATA\nSubject: spoofed\n\nsmuggled\r\n.\n\r\nbye\r\n")

        def raw() -> bytes:
            with socket.create_connection(("127.0.0.1", srv.addresses[0].port), timeout=30) as sock:
                sock.recv(1024)
                sock.sendall(b"EHLO x.example\r\nMAIL FROM:<a@client.example>\r\nRCPT TO:<b@far.example>\r\nDATA\r\n")
                got = b""
                while b"354 " not in got:
                    chunk = sock.recv(4096)
                    assert chunk, f"closed before 354: {got!r}"
                    got += chunk
                sock.sendall(smuggled.encode() + b".\r\nQUIT\r\n")
                return read_all(sock)

        got = await trio.to_thread.run_sync(raw)
        assert got.count(b"queued as") == 1
        await wait_empty(srv)
        [(sender, rcpts, content)] = sink.messages
        assert (sender, rcpts) == ("a@client.example", ["b@far.example"])
        assert b"MAIL FROM:<evil@attacker.example>\r\n" in content  # content, not a command
        assert content.count(b"\n") == content.count(b"\r\n")  # no bare LF leaves trimail
        assert b"\r." not in content.replace(b"\r\n", b"")


async def test_too_many_received_headers_bounce_as_a_loop(start_mta):
    srv = await start_mta(master_service_disable="qmgr", hopcount_limit="3")
    body = "".join(f"Received: from hop{i}\r\n" for i in range(3)) + "Subject: loop\r\n\r\nx\r\n"

    def talk() -> tuple[int, bytes]:
        import smtplib

        with smtplib.SMTP("127.0.0.1", srv.addresses[0].port, timeout=30) as client:
            client.ehlo("x.example")
            client.mail("a@client.example")
            client.rcpt("b@far.example")
            return client.data(body)

    assert await trio.to_thread.run_sync(talk) == (554, b"5.4.0 Error: too many hops")
    assert Store.open(srv.config.queue_directory, readonly=True).list_messages() == []


async def test_oversized_header_section_is_refused(start_mta):
    srv = await start_mta(master_service_disable="qmgr", header_size_limit="2000")
    big = "".join(f"X-Filler-{i}: {'y' * 60}\r\n" for i in range(60)) + "Subject: big\r\n\r\nbody\r\n"
    small = "".join(f"X-Filler-{i}: {'y' * 60}\r\n" for i in range(10)) + "\r\n" + "z" * 5000 + "\r\n"

    def talk(body: str) -> tuple[int, bytes]:
        import smtplib

        with smtplib.SMTP("127.0.0.1", srv.addresses[0].port, timeout=30) as client:
            client.ehlo("x.example")
            client.mail("a@client.example")
            client.rcpt("b@far.example")
            return client.data(body)

    assert await trio.to_thread.run_sync(talk, big) == (552, b"5.6.0 Message header size exceeds fixed limit")
    assert (await trio.to_thread.run_sync(talk, small))[0] == 250  # a big body is fine
