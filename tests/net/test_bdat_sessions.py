"""BDAT (RFC 3030 CHUNKING) over real sockets to a real trimail (the in-process test MTA,
the same serve): raw sockets, since smtplib has no BDAT.  A message sent in chunks is
stored exactly as the same message sent with DATA; the refusals are Postfix's; header
checks, the size limit and smtpd_timeout apply to chunks as to DATA.

Everything binds in 127.0.102.0/24, ports picked by the kernel.
"""

from __future__ import annotations

import logging
import socket
import time

from trimail.testing import TestMTA

HOST = "127.0.102.1"
CLIENT = "127.0.102.7"
HEADERS = b"From: <app@app.example>\r\nTo: <ann@example.com>\r\nSubject: chunks\r\n" \
          b"Message-ID: <m@app.example>\r\nDate: Mon, 07 Dec 2026 05:00:00 +0000\r\n\r\n"
START = b"EHLO app.example\r\nMAIL FROM:<app@app.example>\r\nRCPT TO:<ann@example.com>\r\n"


class Client:
    def __init__(self, mta) -> None:
        self.sock = socket.create_connection((HOST, mta.port), timeout=30, source_address=(CLIENT, 0))
        self.stream = self.sock.makefile("rb")
        assert self.reply().startswith("220 ")

    def reply(self) -> str:
        """The last line of the next reply; "<EOF>" once the server closed."""
        while True:
            line = self.stream.readline()
            if not line:
                return "<EOF>"
            if line[3:4] != b"-":
                return line.decode().rstrip("\r\n")

    def send(self, data: bytes, replies: int) -> list[str]:
        self.sock.sendall(data)
        return [self.reply() for _ in range(replies)]

    def close(self) -> None:
        self.stream.close()
        self.sock.close()


def bdat(chunks: list[bytes]) -> bytes:
    return b"".join(b"BDAT %d%s\r\n" % (len(c), b" LAST" if i == len(chunks) - 1 else b"") + c
                    for i, c in enumerate(chunks))


def without_received(raw: bytes) -> bytes:
    """The message without our Received: header (its first field)."""
    assert raw.startswith(b"Received: ")
    lines = raw.split(b"\r\n")
    at = 1
    while lines[at][:1] in (b" ", b"\t"):
        at += 1
    return b"\r\n".join(lines[at:])


def test_a_message_in_pipelined_chunks_is_stored_as_the_same_message_sent_with_data():
    body = b"line one\r\n.dot line\r\nbare\nlf and a stray\rcr\r\n" + b"x" * 100 + b"\r\nlast without end"
    with TestMTA(smtpd_listen=f"{HOST}:0") as mta:
        client = Client(mta)
        content = HEADERS + body
        chunks = [content[:50], content[50:51], content[51:120], content[120:]]
        got = client.send(START + bdat(chunks) + b"QUIT\r\n", 3 + len(chunks) + 1)
        client.close()
        assert got[:3] == ["250 CHUNKING", "250 2.1.0 Ok", "250 2.1.5 Ok"]
        assert got[3:6] == ["250 2.0.0 Ok: 50 bytes", "250 2.0.0 Ok: 1 bytes", "250 2.0.0 Ok: 69 bytes"]
        by_bdat = mta.wait_for_one(subject="chunks")
        stored = without_received(by_bdat.raw)
        assert got[6] == f"250 2.0.0 Ok: {len(stored)} bytes queued as {by_bdat.queue_id}"
        assert got[7] == "221 2.0.0 Bye"
        mta.clear()

        client = Client(mta)
        data = content.replace(b"\n.", b"\n..") + b"\r\n.\r\n"
        got = client.send(START + b"DATA\r\n" + data + b"QUIT\r\n", 6)
        client.close()
        by_data = mta.wait_for_one(subject="chunks")
        assert got[4] == f"250 2.0.0 Ok: queued as {by_data.queue_id}"
        assert without_received(by_data.raw) == stored
        assert stored.endswith(b"\r\nbare\r\nlf and a stray cr\r\n" + b"x" * 100 + b"\r\nlast without end\r\n")


def test_the_attempt_shows_each_bdat_with_its_reply():
    with TestMTA(smtpd_listen=f"{HOST}:0") as mta:
        client = Client(mta)
        client.send(START + bdat([HEADERS, b"hello\r\n"]) + b"NOOP\r\nQUIT\r\n", 7)
        client.close()
        [attempt] = mta.wait_for_attempts(1)
        assert attempt.commands == ["EHLO app.example", "MAIL FROM:<app@app.example>", "RCPT TO:<ann@example.com>",
                                    f"BDAT {len(HEADERS)}", "BDAT 7 LAST", "NOOP", "QUIT"]
        assert attempt.replies == [220, 250, 250, 250, 250, 250, 250, 221]
        assert attempt.message_bytes == len(HEADERS) + 7


def test_header_checks_and_the_size_limit_apply_to_chunks(tmp_path):
    checks = tmp_path / "header_checks"
    checks.write_text("/^Subject: refuse me/ REJECT not this one\n")
    with TestMTA(smtpd_listen=f"{HOST}:0", message_size_limit=2000, header_checks=f"regexp:{checks}") as mta:
        client = Client(mta)
        got = client.send(START + bdat([b"Subject: refuse me\r\n", b"\r\nbody\r\n"]), 5)
        assert got[3:] == ["250 2.0.0 Ok: 20 bytes", "550 5.7.1 not this one"]
        got = client.send(b"MAIL FROM:<app@app.example>\r\nRCPT TO:<ann@example.com>\r\nBDAT 1500\r\n"
                          + (b"y" * 98 + b"\r\n") * 15 + b"BDAT 600 LAST\r\n" + b"z" * 600 + b"NOOP\r\n", 5)
        assert got == ["250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.0.0 Ok: 1500 bytes",
                       "552 5.3.4 Chunk exceeds message size limit", "250 2.0.0 Ok"]
        client.close()
        mta.assert_nothing_sent()


def test_discarded_chunking_is_not_offered_and_bdat_ends_the_session():
    with TestMTA(smtpd_listen=f"{HOST}:0", smtpd_discard_ehlo_keywords="chunking") as mta:
        client = Client(mta)
        client.sock.sendall(b"EHLO app.example\r\n")
        lines = []
        while not lines or lines[-1][3:4] != b" ":
            lines.append(client.stream.readline())
        assert b"CHUNKING" not in b"".join(lines)
        got = client.send(b"MAIL FROM:<app@app.example>\r\nRCPT TO:<ann@example.com>\r\nBDAT 4 LAST\r\nQUIT", 4)
        assert got == ["250 2.1.0 Ok", "250 2.1.5 Ok", "521 5.5.1 Error: command not implemented", "<EOF>"]
        client.close()


def test_a_client_silent_inside_a_chunk_gets_the_timeout():
    with TestMTA(smtpd_listen=f"{HOST}:0", smtpd_timeout="1s") as mta:
        client = Client(mta)
        started = time.monotonic()
        got = client.send(START + b"BDAT 100 LAST\r\n0123456789", 5)
        assert got[3:] == ["421 4.4.2 trimail.test Error: timeout exceeded", "<EOF>"]
        assert time.monotonic() - started < 10
        client.close()
        client = Client(mta)  # the same inside a refused chunk (its bytes are read before the refusal)
        got = client.send(b"EHLO app.example\r\nBDAT 100 LAST\r\n0123456789", 3)
        assert got[1:] == ["421 4.4.2 trimail.test Error: timeout exceeded", "<EOF>"]
        client.close()
        mta.assert_nothing_sent()


def test_a_big_chunk_is_stored_whole():
    line = b"0123456789" * 99 + b"\r\n"
    body = line * 5000  # 4.95 MB in one chunk
    with TestMTA(smtpd_listen=f"{HOST}:0", message_size_limit=10_000_000) as mta:
        client = Client(mta)
        got = client.send(START + bdat([HEADERS + body]) + b"QUIT\r\n", 5)
        client.close()
        message = mta.wait_for_one(subject="chunks")
        assert got[3] == f"250 2.0.0 Ok: {len(HEADERS) + len(body)} bytes queued as {message.queue_id}"
        assert without_received(message.raw) == HEADERS + body


def test_reject_unauth_pipelining_does_not_take_a_chunks_bytes_for_pipelining():
    # Postfix: BDAT is no "last command of a group" (RFC 2920); only DATA is checked
    with TestMTA(smtpd_listen=f"{HOST}:0", smtpd_data_restrictions="reject_unauth_pipelining") as mta:
        client = Client(mta)
        got = client.send(b"EHLO app.example\r\n", 1)
        got += client.send(b"MAIL FROM:<app@app.example>\r\n", 1) + client.send(b"RCPT TO:<ann@example.com>\r\n", 1)
        got += client.send(bdat([HEADERS + b"body\r\n"]), 1)
        assert got[-1].startswith("250 2.0.0 Ok: ") and " bytes queued as " in got[-1]
        got = client.send(START + b"DATA\r\n" + HEADERS + b"body\r\n.\r\n", 5)
        assert got[-2].startswith("503 5.5.0 ") and "pipelining" in got[-2]
        client.close()


def test_postfixs_warnings_for_null_too_big_and_malformed_bdat(caplog):
    caplog.set_level(logging.INFO, logger="trimail.smtpd")
    with TestMTA(smtpd_listen=f"{HOST}:0", message_size_limit=1000) as mta:
        client = Client(mta)
        again = START.split(b"\r\n", 1)[1]  # MAIL and RCPT
        got = client.send(START + b"BDAT 0\r\nBDAT 2 LAST\r\nxy" + again + b"BDAT 1001\r\n" + b"z" * 1001
                          + b"BDAT 1x\r\n", 10)
        assert got[3:] == ["551 5.7.1 Null BDAT request", "551 5.0.0 Discarded 2 bytes after earlier error",
                           "250 2.1.0 Ok", "250 2.1.5 Ok", "552 5.3.4 Chunk exceeds message size limit",
                           "521 5.5.4 Syntax: BDAT count [LAST]", "<EOF>"]
        client.close()
        mta.wait_for_attempts(1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    client = f"[{CLIENT}]"
    [queue_id] = {w.split(":", 1)[0] for w in warnings if w.endswith(f"null BDAT request from unknown{client}")}
    assert queue_id != "NOQUEUE"  # after the first accepted RCPT
    assert any(w.endswith(f": BDAT request from unknown{client} exceeds message size limit") for w in warnings)
    assert f"NOQUEUE: malformed BDAT command syntax from unknown{client}" in warnings, warnings
