"""The mail log's writer thread (trimail.log)."""

from __future__ import annotations

import io
import logging
import os
import threading
import time

import pytest

from trimail import log as maillog


@pytest.fixture
def stream():
    """setup() to a counting stream; the ``trimail`` logger is put back afterwards."""
    root = logging.getLogger("trimail")
    saved = list(root.handlers), root.level, root.propagate
    counting = CountingStream()
    maillog.setup("mx.test.example", stream=counting)
    try:
        yield counting
    finally:
        maillog.shutdown(timeout=1)
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
        root.propagate = saved[2]


class CountingStream(io.StringIO):
    """stderr stand-in that counts the write() calls reaching it."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.lock = threading.Lock()

    def write(self, text: str) -> int:
        with self.lock:
            self.writes += 1
            return super().write(text)

    def text(self) -> str:
        with self.lock:
            return self.getvalue()


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def test_lines_logged_together_are_written_together_in_order(stream):
    log = logging.getLogger("trimail.smtpd")
    for i in range(2000):
        log.info("connect from unknown[127.0.0.%d]", i)
    wait_until(lambda: stream.text().count("\n") >= 2000)
    lines = stream.text().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == [f"connect from unknown[127.0.0.{i}]" for i in range(2000)]
    assert all(" mx trimail/smtpd[" in line for line in lines)
    assert stream.writes < 200  # batches, not one write per line


def test_a_line_logged_when_idle_is_written_at_once_and_none_is_lost_at_shutdown(stream):
    log = logging.getLogger("trimail.master")
    log.info("first")
    wait_until(lambda: "first" in stream.text(), timeout=1.0)
    log.warning("last %s", "words")
    maillog.shutdown()
    assert stream.text().splitlines()[-1].endswith(f"trimail/master[{os.getpid()}]: warning: last words")
