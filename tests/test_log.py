"""The mail log's writer thread (trimail.log)."""

from __future__ import annotations

import io
import logging
import os
import threading
import time

import pytest

from tests.conftest import mail_log
from trimail import log as maillog


@pytest.fixture
def stream():
    """setup() to a counting stream; the ``trimail`` logger is put back afterwards."""
    counting = CountingStream()
    with mail_log(stream=counting):
        yield counting


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


class GatedStream(CountingStream):
    """A destination whose writes wait until ``gate`` is set (a stuck disk or pipe)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def write(self, text: str) -> int:
        self.gate.wait(30)
        return super().write(text)


@pytest.fixture
def gated():
    stream = GatedStream()
    with mail_log(stream=stream):
        try:
            yield stream
        finally:
            stream.gate.set()  # before the writer is stopped: it may be inside a write


def test_a_mark_acts_once_after_its_lines_are_written_when_the_commit_ends_first(gated):
    """receive.commit: the commit is done before the lines are written; the writer
    thread acts then, once, and only after the line before the mark is out."""
    calls = []
    logging.getLogger("trimail.cleanup").info("QID: message-id=<m@example>")
    mark = maillog.mark()
    assert mark is not None
    mark.then(lambda: calls.append(("message-id=<m@example>" in gated.text(), threading.get_ident())))
    assert calls == []  # the destination holds the line: no wake-up yet
    gated.gate.set()
    wait_until(lambda: calls)
    assert calls == [(True, maillog._listener._thread.ident)]  # from the writer thread, after the line


def test_a_mark_acts_at_once_in_the_committer_when_the_lines_are_written_first(stream):
    logging.getLogger("trimail.cleanup").info("QID: message-id=<m@example>")
    mark = maillog.mark()
    assert mark is not None
    wait_until(lambda: len(mark._turns) == 1)  # the writer has been past it
    calls = []
    mark.then(lambda: calls.append(threading.get_ident()))
    assert calls == [threading.get_ident()]
    assert "message-id=<m@example>" in stream.text()


def test_no_mark_is_put_while_the_destination_is_stuck(gated, monkeypatch):
    """A stuck destination must not hold up the qmgr's wake-ups for good: once a mark
    has waited STUCK_AFTER, mark() gives None (the caller wakes the qmgr itself)."""
    monkeypatch.setattr(maillog, "STUCK_AFTER", 0.01)
    logging.getLogger("trimail.smtpd").info("a line the destination will not take")
    first = maillog.mark()
    assert first is not None
    wait_until(lambda: maillog.mark() is None)
    gated.gate.set()  # it moves again: marks are put again once the waiting one is reached
    wait_until(lambda: maillog.mark() is not None)


_PIPE_WRITER = """
import logging, os, sys
from trimail import log as maillog
maillog.setup("mx.test.example", stream=os.fdopen(int(sys.argv[1]), "w"))
log = logging.getLogger("trimail.smtpd")
for i in range(3000):
    log.info("%s line %d %s", sys.argv[2], i, "x" * 80)
maillog.shutdown()
"""


def test_processes_logging_into_one_pipe_never_cut_each_others_lines():
    """Workers share stderr (a pipe or socket under systemd) or a FIFO: a write of
    more than PIPE_BUF bytes into it may be cut by another process's lines while the
    reader lags, so the batches go in pieces of whole lines (log.destinations)."""
    import fcntl
    import re
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, 1031, 4096)  # F_SETPIPE_SZ: a small pipe, full most of the time
    writers = [subprocess.Popen([sys.executable, "-c", _PIPE_WRITER, str(write_end), name], pass_fds=(write_end,))
               for name in ("AAAA", "BBBB")]
    os.close(write_end)
    data = bytearray()
    with os.fdopen(read_end, "rb") as reader:
        while chunk := reader.read1(512):  # a reader that takes little at a time
            data += chunk
    assert [writer.wait(60) for writer in writers] == [0, 0]
    lines = data.decode().splitlines()
    whole = re.compile(r".* trimail/smtpd\[\d+\]: (AAAA|BBBB) line \d+ x{80}")
    assert [line for line in lines if not whole.fullmatch(line)] == []
    assert len(lines) == 6000
