"""Red team 38's second lead: scans of a slow rule kept the event loop from running.

A regexp rule's match holds the interpreter; with four scan threads in slow matches
(70 ms each) the event loop waited its turn among all of them, and a banner took up
to 14.8 s.  The scans of a process now take turns for their lookups
(trimail.receive.checks.scan_spool), so that at most one scan thread asks for the
interpreter at a time and another thread has it after each match."""

from __future__ import annotations

import threading
import time

from trimail.cleanup.checks import ContentChecks
from trimail.maps import open_table
from trimail.queue.spool import Spool
from trimail.receive.checks import scan_spool

SCANS = 6
SLOW_LINES = 15


def test_another_thread_has_the_interpreter_after_each_slow_match(tmp_path):
    """The main thread counts the times it has the interpreter back while six scans
    match a rule of about 20 ms on 15 lines each: with turns it had it about once a
    match or more; without, once in five matches."""
    rules = tmp_path / "rules"
    rules.write_text("/^X-Slow-[0-9]+: (a|aa)+$/ WARN slow\n")  # slow as it fails on the "!"
    table = [open_table(f"regexp:{rules}")]
    checks = ContentChecks(table, table, table, table)
    message = b"Subject: s\r\n" + b"".join(b"X-Slow-%d: " % n + b"a" * 23 + b"!\r\n" for n in range(SLOW_LINES)) \
        + b"\r\nbody\r\n"
    done: list[int] = []

    def scan() -> None:
        spool, out = Spool(tmp_path), Spool(tmp_path)
        spool.write(message)
        outcome = scan_spool(checks, spool, out, lambda *note: None)
        assert outcome.reject is None and out.size == len(message)
        spool.close()
        out.close()
        done.append(1)

    threads = [threading.Thread(target=scan) for _ in range(SCANS)]
    for thread in threads:
        thread.start()
    turns = 0
    while len(done) < SCANS and any(thread.is_alive() for thread in threads):
        turns += 1
        time.sleep(0)  # hands the interpreter on, and waits for it back
    for thread in threads:
        thread.join()
    assert len(done) == SCANS
    assert turns >= 0.6 * SCANS * SLOW_LINES, turns
