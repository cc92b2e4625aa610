"""What trimail relays on the wire: only CRLF line ends, whatever a client sent.

A real ``trimail serve`` relays (``relayhost``) to ``RawPeer``, an SMTP server that
keeps the exact bytes of each DATA section.  A raw-socket client sends content with
a bare CR before a dot (``\\r.\\r\\n``: a lax downstream that ends DATA at
``<CR>.<CR>`` would see two messages) and bare LFs.  The peer must get exactly one
message whose content has no CR or LF outside a CRLF pair.
"""

from __future__ import annotations

import random
import re
import socket
import threading
from collections.abc import Iterator
from typing import Self

import pytest

from tests.faults.conftest import assert_serving, wait_until
from tests.smtp.test_content_normalise import data_model

STRAY = re.compile(rb"\r(?!\n)|(?<!\r)\n")


class RawPeer:
    """A minimal, strict SMTP server on 127.0.0.1:0 in a thread; ``messages`` holds
    the raw bytes between ``DATA`` and ``CRLF.CRLF`` (still dot-stuffed)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.messages: list[bytes] = []
        self._stop = False
        self._conn: socket.socket | None = None  # the session in progress (a cached delivery connection)
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self.sock.close()
        conn = self._conn
        if conn is not None:  # trimail keeps its delivery connection open for the next message:
            try:  # end our side now, not when its connection cache gives it up (2 s)
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(5)

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                self._conn = conn
                conn.settimeout(10)
                try:
                    self._session(conn)
                except OSError:
                    pass

    def _session(self, conn: socket.socket) -> None:
        buf = bytearray()

        def line() -> bytes:
            while b"\r\n" not in buf:
                chunk = conn.recv(65536)
                if not chunk:
                    raise OSError("closed")
                buf.extend(chunk)
            end = buf.index(b"\r\n") + 2
            out = bytes(buf[:end])
            del buf[:end]
            return out

        conn.sendall(b"220 raw.peer ESMTP\r\n")
        while True:
            verb = line()[:4].upper()
            if verb == b"EHLO":
                conn.sendall(b"250-raw.peer\r\n250 8BITMIME\r\n")
            elif verb == b"DATA":
                conn.sendall(b"354 go ahead\r\n")
                while b"\r\n.\r\n" not in b"\r\n" + buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        raise OSError("closed")
                    buf.extend(chunk)
                whole = b"\r\n" + bytes(buf)
                end = whole.index(b"\r\n.\r\n")
                self.messages.append(whole[2:end + 2])
                del buf[:end + 3]
                conn.sendall(b"250 2.0.0 Ok: queued\r\n")
            elif verb == b"QUIT":
                conn.sendall(b"221 2.0.0 Bye\r\n")
                return
            else:
                conn.sendall(b"250 2.0.0 Ok\r\n")


@pytest.fixture
def raw_peer() -> Iterator[RawPeer]:
    with RawPeer() as peer:
        yield peer


def _until_bye(sock: socket.socket, buf: bytes = b"") -> bytes:
    """*buf* and what the server sends until its 221 (or the end of the connection)."""
    while b"\r\n221 " not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            break
        buf += chunk
    return buf


def _raw_session(port: int, content: bytes) -> list[bytes]:
    """EHLO, MAIL, RCPT, DATA with *content* as it is, then QUIT; the reply lines."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"EHLO client.example\r\nMAIL FROM:<a@client.example>\r\n"
                     b"RCPT TO:<b@remote.example>\r\nDATA\r\n")
        buf = b""
        while b"354 " not in buf:
            chunk = sock.recv(4096)
            assert chunk, buf
            buf += chunk
        sock.sendall(content + b"QUIT\r\n")
        buf = _until_bye(sock, buf)
    return buf.split(b"\r\n")


@pytest.mark.parametrize(("content", "kept"), [
    (b"Subject: cr\r\n\r\nfirst\r.\r\nMAIL FROM:<evil@x.example>\r\nsecond\r\n.\r\n",
     b"first .\r\nMAIL FROM:<evil@x.example>\r\nsecond\r\n"),
    (b"Subject: lf\n\nfirst\n.\nMAIL FROM:<evil@x.example>\nsecond\r\n.\r\n",
     b"MAIL FROM:<evil@x.example>\r\nsecond\r\n"),
    (b"Subject: mixed\r\n\r\na\rb\nc\r\r\n\r.\r\r\nMAIL FROM:<evil@x.example>\r\n.\r\n",
     b"a b\r\nc \r\n . \r\nMAIL FROM:<evil@x.example>\r\n"),
], ids=["bare-cr-dot", "bare-lf-dot", "mixed"])
def test_relayed_content_has_only_crlf_line_ends(daemon, raw_peer, content, kept):
    d = daemon(relayhost=f"[127.0.0.1]:{raw_peer.port}", mynetworks="127.0.0.0/8")
    lines = _raw_session(d.port, content)
    assert sum(1 for line in lines if line.startswith(b"250 2.0.0 Ok: queued as")) == 1, lines
    wait_until(lambda: raw_peer.messages, 15)
    assert len(raw_peer.messages) == 1
    relayed = raw_peer.messages[0]
    assert not STRAY.search(relayed), relayed
    assert relayed.endswith(kept)  # content, not a second message
    assert_serving(d)


def _big_content(seed: int, size: int, bare_lf: bool) -> bytes:
    """Mail-like lines up to *size* bytes: mostly CRLF text, some stuffed dots, lines
    past the reader's 4,096-byte flush, stray CRs, and with *bare_lf* bare LFs (which
    send the reader line by line; without them it reads in bulk)."""
    rng = random.Random(seed)
    parts = [b"Subject: big\r\n\r\n"]
    total = 0
    while total < size:
        kind = rng.random()
        if kind < 0.80:
            line = b"y" * rng.randrange(0, 90) + b"\r\n"
        elif kind < 0.88:
            # stuffed as a client sends it; never a lone "." (that would end the message)
            line = b"." + b"." * rng.randrange(0, 2) + b"x" * rng.randrange(1, 20) + b"\r\n"
        elif kind < 0.92:
            line = b"z" * rng.randrange(4000, 9000) + b"\r\n"
        elif kind < 0.96 or not bare_lf:
            line = b"a\rb." * rng.randrange(1, 5) + b"\r\n"
        else:
            line = b"bare" + b"\n" + b".dot\n"
        parts.append(line)
        total += len(line)
    return b"".join(parts)


@pytest.mark.parametrize(("size", "bare_lf"), [(100_000, False), (100_000, True), (400_000, False)],
                         ids=["in-memory", "in-memory-bare-lf", "spilled"])
def test_relayed_content_is_what_the_line_rules_give(daemon, raw_peer, size, bare_lf):
    """Big messages (the DATA reader's bulk pass; over 256 KiB the spool file too)
    arrive downstream exactly as the DATA rules, applied one line at a time, say."""
    d = daemon(relayhost=f"[127.0.0.1]:{raw_peer.port}", mynetworks="127.0.0.0/8")
    content = _big_content(size, size, bare_lf)
    assert b"\r\n.\r\n" not in b"\r\n" + content  # one message, to its end
    lines = _raw_session(d.port, content + b"\r\n.\r\n")
    assert sum(1 for line in lines if line.startswith(b"250 2.0.0 Ok: queued as")) == 1, lines[-5:]
    wait_until(lambda: raw_peer.messages, 15)
    expected, ended = data_model(content + b"\r\n.\r\n", replace=True)
    assert ended
    body = expected[len(b"Subject: big\r\n"):]  # from the blank line: every line start follows a CRLF
    relayed = raw_peer.messages[0]  # as sent downstream: dot-stuffed, lines past 998 broken with CRLF SPACE
    assert max(len(line) for line in relayed.split(b"\r\n")) <= 998 + 1  # (smtp_line_length_limit; a dot)
    assert relayed.replace(b"\r\n ", b"").endswith(body.replace(b"\r\n.", b"\r\n..")), len(relayed)
    assert_serving(d)


def _send_raw(port: int, content: bytes) -> list[bytes]:
    """Like _raw_session, but returns every reply line up to the closing 221 or EOF."""
    return [line for line in _raw_session(port, content) if line[:1].isdigit()]


def test_bare_lf_is_refused_with_postfix_reply_when_forbidden(daemon):
    d = daemon(smtpd_forbid_bare_newline="reject", mynetworks="127.0.0.0/8",
               smtpd_forbid_bare_newline_exclusions="")
    lines = _send_raw(d.port, b"Subject: lf\nbody\r\n.\r\n")
    assert b"550 5.5.2 mx.test.example Error: bare <LF> received" in lines, lines
    assert not any(line.startswith(b"250 2.0.0 Ok: queued") for line in lines)
    assert lines[-1].startswith(b"221")  # the session goes on after the real end
    assert_serving(d)


def test_bare_lf_exclusions_normalize_for_listed_clients(daemon, raw_peer):
    d = daemon(smtpd_forbid_bare_newline="reject", mynetworks="127.0.0.0/8",
               relayhost=f"[127.0.0.1]:{raw_peer.port}")
    lines = _send_raw(d.port, b"Subject: lf\nbody\r\n.\r\n")  # exclusions default to $mynetworks
    assert any(line.startswith(b"250 2.0.0 Ok: queued") for line in lines), lines
    wait_until(lambda: raw_peer.messages, 15)
    assert raw_peer.messages[0].endswith(b"Subject: lf\r\nbody\r\n")


def test_serve_refuses_a_line_separator_in_rcpt(daemon):
    d = daemon()
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as sock:
        sock.sendall("EHLO c.example\r\nMAIL FROM:<a@c.example> SMTPUTF8\r\n"
                     "RCPT TO:<victim\u2028@mx.test.example>\r\nQUIT\r\n".encode())
        buf = _until_bye(sock)
    assert b"\r\n501 5.1.3 Bad recipient address syntax\r\n" in buf, buf
    assert_serving(d)


def test_helo_name_is_stored_printable(daemon, raw_peer):
    d = daemon(relayhost=f"[127.0.0.1]:{raw_peer.port}", mynetworks="127.0.0.0/8")
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as sock:
        sock.sendall("EHLO evil\x1b[2J\u2028\x85.example\r\nMAIL FROM:<a@c.example>\r\n"
                     "RCPT TO:<b@remote.example>\r\nDATA\r\nSubject: h\r\n\r\nx\r\n.\r\nQUIT\r\n".encode())
        buf = _until_bye(sock)
    assert b"250 2.0.0 Ok: queued as" in buf, buf
    wait_until(lambda: raw_peer.messages, 15)
    received = raw_peer.messages[0].split(b"\r\n", 1)[0].decode("utf-8")
    assert received.startswith("Received: from evil?[2J??.example ("), received
    assert all(ch.isprintable() for ch in received)
