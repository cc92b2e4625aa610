"""Red team 38: the header and body checks under a flood of large messages, against a
real serve."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.faults.conftest import assert_serving, read_line, smtp_command
from tests.faults.test_redteam36b import SLOW_HEADER_RULE, slow_headers
from trimail.receive.checks import SCAN_THREADS


def _open_transaction(port: int) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port), timeout=120)
    conn.recv(4096)
    for line in (b"EHLO client.example", b"MAIL FROM:<alice@client.example>", b"RCPT TO:<bob@remote.example>",
                 b"DATA"):
        assert smtp_command(conn, line)[:1] in (b"2", b"3"), line
    return conn


def test_waiting_for_a_scan_thread_is_not_a_table_that_cannot_answer(daemon, tmp_path: Path) -> None:
    """The watchdog of a scan (a line taken within table_lookup_timeout) counted the wait
    for a free scan thread: with every thread busy on big messages, mail whose tables
    answered at once was refused ``451 4.3.0 ... no progress within 20s`` (red team 38:
    45 of 100 messages of 40 MB at once).  Now only the scan itself is watched; the wait
    is bounded by the session's smtpd_timeout.  Here two more messages than there are
    scan threads end their DATA at once: two of them wait for a thread while the others
    take seconds (lines of a few ms each, taking turns), far past the 1 s bound."""
    rules = tmp_path / "header_checks"
    rules.write_text(SLOW_HEADER_RULE)
    d = daemon(smtpd_workers="0", header_checks=f"regexp:{rules}", table_lookup_timeout="1s",
               message_size_limit=10_000_000)
    busy = b"Subject: slow\r\n" + slow_headers(120) + b"\r\nbody\r\n.\r\n"
    sessions = [_open_transaction(d.port) for _ in range(SCAN_THREADS + 2)]
    for conn in sessions:  # every scan thread taken, and two scans waiting for one
        conn.sendall(busy)
    for conn in sessions:
        reply = read_line(conn)
        assert reply.startswith(b"250 "), reply
        conn.close()
    assert_serving(d)
