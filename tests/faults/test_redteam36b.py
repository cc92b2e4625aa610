"""Red team 36b: header_checks and body_checks against a real serve (hostile
clients, careless operators)."""

from __future__ import annotations

import smtplib
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.faults.conftest import (
    assert_serving,
    banner,
    send,
    serve_status,
    smtp_command,
    trimail_cmd,
    wait_until,
)

# Python's re backtracks 2**34 times on this Subject: the scan never ends in a test's time
SLOW_RULE = "/^Subject: (a|aa)+$/ REJECT slow\n"  # (the regex module makes (a+)+ linear, not this)
SLOW_MESSAGE = b"Subject: " + b"a" * 60 + b"!\r\n\r\nbody\r\n"


def _send_in_background(port: int, body: bytes) -> dict:
    """Send *body* from a thread; the dict gets the end-of-DATA reply (or the error)."""
    result: dict = {}

    def run() -> None:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=120) as client:
                client.ehlo("client.example")
                client.mail("alice@client.example")
                client.rcpt("bob@remote.example")
                result["reply"] = client.data(body)
        except Exception as exc:  # noqa: BLE001 - reported to the test
            result["error"] = exc
        result["done"] = time.monotonic()

    threading.Thread(target=run, daemon=True).start()
    return result


# each of these headers costs the rule a few ms (about 1.6**22 steps): slow, never stuck,
# well within maps.patterns.MATCH_TIMEOUT
def slow_headers(count: int) -> bytes:
    return b"".join(b"X-Slow-%d: " % n + b"a" * 22 + b"!\r\n" for n in range(count))
SLOW_HEADER_RULE = "/^X-Slow-[0-9]+: (a|aa)+$/ WARN slow\n"


def _slow_daemon(daemon, tmp_path: Path, rule: str, **params):
    rules = tmp_path / "header_checks"
    rules.write_text(rule)
    return daemon(header_checks=f"regexp:{rules}", table_lookup_timeout="3s", message_size_limit=10_000_000,
                  **params)


@pytest.mark.parametrize("workers", ["0", "2"])
def test_slow_scan_of_a_small_message_is_off_the_event_loop(daemon, tmp_path: Path, workers: str) -> None:
    """A message small enough to stay in memory was scanned through off_loop: on the
    event loop itself within a second of the table's last check (every session and
    ``trimail status`` waited), else on a lookup thread with table_lookup_timeout for
    the whole scan (160 headers a rule needs 50 ms each, 8 s, got 451 although every
    lookup answered).  Now every scan runs on a thread and only a line that takes
    longer than table_lookup_timeout fails it: serve answers meanwhile, the mail is
    accepted."""
    d = _slow_daemon(daemon, tmp_path, SLOW_HEADER_RULE, smtpd_workers=workers)
    send(d.port, ["bob@remote.example"])  # the table is loaded: no reload due for a while
    result = _send_in_background(d.port, b"Subject: slow\r\n" + slow_headers(300) + b"\r\nbody\r\n")
    answered = 0
    while "done" not in result:  # serve answers all along
        greeting = banner(d.port, timeout=3)
        assert greeting.startswith("220 "), greeting
        answered += 1
    assert result.get("reply", (None,))[0] == 250, result
    assert answered > 1
    assert_serving(d)


@pytest.mark.parametrize("workers", ["0", "2"])
def test_stop_during_a_long_scan_ends_it(daemon, tmp_path: Path, workers: str) -> None:
    """The scan of a message in a spool file ran in a thread trio could not cancel:
    ``trimail stop`` during a 20 s scan waited for all of it, past graceful_timeout.
    Now the scan is abandoned at its next line and stop takes graceful_timeout."""
    d = _slow_daemon(daemon, tmp_path, SLOW_HEADER_RULE, smtpd_workers=workers, graceful_timeout="2s")
    body = b"Subject: slow\r\n" + slow_headers(1500) + b"\r\n" + (b"x" * 78 + b"\r\n") * 5000
    conn = socket.create_connection(("127.0.0.1", d.port), timeout=120)
    conn.recv(4096)
    for line in (b"EHLO client.example", b"MAIL FROM:<alice@client.example>", b"RCPT TO:<bob@remote.example>",
                 b"DATA"):
        assert smtp_command(conn, line)[:1] in (b"2", b"3")
    conn.sendall(body + b".\r\n")  # the end of DATA: the scan begins
    started = time.monotonic()
    stop = trimail_cmd("stop", "-c", str(d.config_path), timeout=60)
    assert stop.returncode == 0, stop.stderr
    wait_until(lambda: not d.alive, timeout=60)
    assert time.monotonic() - started < 10
    answer = b""
    while chunk := conn.recv(4096):
        answer += chunk
    assert not answer.startswith(b"250"), answer
    conn.close()


def test_slow_regexp_never_holds_the_loop_and_honours_table_lookup_timeout(daemon, tmp_path: Path) -> None:
    """A header_checks rule with catastrophic backtracking (an operator's mistake): the scan
    ran on the event loop for a message that stays in memory (every other session,
    status and stop waited on it forever) and in an uncancellable thread for a bigger
    one (the session never answered, stop never finished); Python's ``re`` holds the
    interpreter for the whole match, so no thread bounded it.  Now the rules are the
    ``regex`` module's, each match bounded (maps.patterns.MATCH_TIMEOUT): a lookup
    error like any other, 451 4.3.0, and serve answers meanwhile."""
    rules = tmp_path / "header_checks"
    rules.write_text(SLOW_RULE)
    workers, padding = "0", 0
    d = daemon(smtpd_workers=workers, header_checks=f"regexp:{rules}", table_lookup_timeout="2s",
               message_size_limit=10_000_000)
    body = SLOW_MESSAGE + b"x" * 78 + b"\r\n" if not padding else \
        SLOW_MESSAGE + (b"x" * 78 + b"\r\n") * (padding // 80)
    result = _send_in_background(d.port, body)
    deadline = time.monotonic() + 20
    while "done" not in result and time.monotonic() < deadline:  # serve answers all along
        greeting = banner(d.port, timeout=5)
        assert greeting.startswith("220 "), greeting
        assert serve_status(d.queue_directory) is not None
    assert "done" in result, "the session never answered the end of DATA"
    assert result.get("reply", (None,))[0] == 451, result
    assert_serving(d)
    stop = trimail_cmd("stop", "-c", str(d.config_path), timeout=60)
    assert stop.returncode == 0, stop.stderr
    wait_until(lambda: not d.alive, timeout=30)
