"""The mail log's writer thread (trimail.log)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
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


@contextlib.contextmanager
def _writer_hushed():
    """Wait until the writer thread sleeps, and keep lines and marks from waking it in
    the block (so a committer's write_waiting does not race with it for the lock)."""
    listener = maillog._listener
    wait_until(lambda: listener.sleeping and listener.queue.empty())
    listener.sleeping = False  # a put rings the bell only while this is True
    try:
        yield
    finally:
        listener.bell.put_nowait(None)


def test_a_committer_writes_the_lines_itself_into_a_file_before_its_commit(tmp_path):
    """log.write_waiting: into a file the smtpd worker's loop writes the lines waiting
    when it would mark (before the commit), instead of waking the writer thread."""
    path = tmp_path / "maillog"
    with mail_log(maillog_file=str(path)):
        assert maillog._listener.direct
        with _writer_hushed():
            for n in range(50):
                logging.getLogger("trimail.cleanup").info("Q%d: message-id=<m%d@example>", n, n)
                assert maillog.mark() is None  # nothing to wait for: ...
                assert f"Q{n}: message-id=<m{n}@example>" in path.read_text()  # ... the line is out
                assert not maillog._listener.hurry.is_set()  # and nobody was woken for it


def test_lines_written_by_committers_and_the_writer_thread_keep_their_order(tmp_path):
    """Whoever takes lines from the queue writes them before anyone takes more."""
    path = tmp_path / "maillog"
    per_thread = 3000

    def work(name: str) -> None:
        log = logging.getLogger("trimail.smtpd")
        for n in range(per_thread):
            log.info("%s %d", name, n)
            if n % 7 == 0:
                maillog.mark()
                maillog.write_waiting()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # the threads take turns between any two steps
    try:
        with mail_log(maillog_file=str(path)):
            threads = [threading.Thread(target=work, args=(f"t{i}",)) for i in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    finally:
        sys.setswitchinterval(interval)
    seen: dict[str, list[int]] = {}
    for line in path.read_text().splitlines():
        name, n = line.rsplit(": ", 1)[1].split()
        seen.setdefault(name, []).append(int(n))
    assert seen == {f"t{i}": list(range(per_thread)) for i in range(4)}


def test_a_pipe_or_a_terminal_is_left_to_the_writer_thread(tmp_path):
    """A write into a pipe, a socket or a terminal can wait for its reader: then the
    committer only hurries the writer thread (which the mark did already)."""
    import pty

    from trimail.log.destinations import StreamLog

    read_end, write_end = os.pipe()
    primary, secondary = pty.openpty()
    try:
        with os.fdopen(write_end, "w") as pipe, os.fdopen(secondary, "w") as tty, \
                open(os.devnull, "w") as null, open(tmp_path / "file", "w") as file:
            assert [StreamLog(s).never_waits() for s in (pipe, tty, null, file)] == [False, False, True, True]
    finally:
        os.close(read_end)
        os.close(primary)


def test_without_a_file_a_mark_is_put_and_the_writer_hurried(stream):
    logging.getLogger("trimail.cleanup").info("QID: message-id=<m@example>")
    assert not maillog._listener.direct and not maillog.write_waiting()
    mark = maillog.mark()
    assert mark is not None
    wait_until(lambda: len(mark._turns) == 1)  # the writer has been past it
    assert "message-id=<m@example>" in stream.text()


def test_a_committer_never_reopens_a_moved_log_file_itself(tmp_path):
    """After logrotate moved the file, the next write reopens the path: that open can
    wait (a FIFO nobody reads took the file's place here; an open on a hung disk),
    so it is the writer thread's, never the loop's (mark() returns at once and puts a
    mark instead).  The writer is kept asleep until the committer has marked: once it
    has refused the FIFO (opened without waiting since red team 33c), the name is
    no longer a move to reopen, and the committer would write the moved file itself."""
    path = tmp_path / "maillog"
    with mail_log(maillog_file=str(path)):
        marked = []
        with _writer_hushed():
            logging.getLogger("trimail.smtpd").info("before")
            assert maillog.mark() is None and "before" in path.read_text()
            path.rename(tmp_path / "maillog.1")
            os.mkfifo(path)
            logging.getLogger("trimail.smtpd").info("after")
            committer = threading.Thread(target=lambda: marked.append(maillog.mark()), daemon=True)
            committer.start()
            committer.join(5)
            assert not committer.is_alive(), "mark() waited for the FIFO"
            assert marked and marked[0] is not None  # left to the writer thread
        reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # lets a writer's open return
        try:
            wait_until(lambda: len(marked[0]._turns) < 2)  # the writer has been past it
        finally:
            os.close(reader)


def test_a_mark_put_while_the_writer_sleeps_wakes_it(stream):
    """A mark is put without a line after it: it must ring the writer's bell itself,
    or its wake-up of the qmgr waits for the next line logged (or STUCK_AFTER)."""
    logging.getLogger("trimail.cleanup").info("QID: message-id=<m@example>")
    listener = maillog._listener
    wait_until(lambda: "message-id=<m@example>" in stream.text() and listener.sleeping and listener.queue.empty())
    mark = maillog.mark()
    assert mark is not None
    wait_until(lambda: len(mark._turns) == 1, timeout=2)  # the writer has been past it


def test_a_committer_writes_into_the_open_file_when_it_is_moved_after_the_check(tmp_path, monkeypatch):
    """The path can be moved (a FIFO nobody reads put in its place) between the
    committer's look (``Writer.direct``) and its write: the write goes into the open,
    moved file, and only the writer thread reopens (found by a red team: the worker's
    loop hung in open() for good, one time in about 50 rotations under load)."""
    from trimail.log.writer import Writer

    path = tmp_path / "maillog"
    with mail_log(maillog_file=str(path)):
        with _writer_hushed():
            logging.getLogger("trimail.smtpd").info("before")
            assert maillog.mark() is None
            path.rename(tmp_path / "maillog.1")
            os.mkfifo(path)
            monkeypatch.setattr(Writer, "direct", property(lambda self: True))  # it looked before the move
            logging.getLogger("trimail.smtpd").info("after")
            committer = threading.Thread(target=maillog.mark, daemon=True)
            committer.start()
            committer.join(5)
            reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # (lets a stuck open return)
            try:
                assert not committer.is_alive(), "the committer opened the FIFO"
                assert (tmp_path / "maillog.1").read_text().splitlines()[-1].endswith("after")
            finally:
                monkeypatch.undo()
                os.close(reader)


def test_a_committer_writes_every_line_waiting_not_only_one_batch(tmp_path):
    from trimail.log.writer import BATCH_LINES

    path = tmp_path / "maillog"
    with mail_log(maillog_file=str(path)):
        with _writer_hushed():
            for n in range(BATCH_LINES * 3 + 7):
                logging.getLogger("trimail.smtpd").info("line %d", n)
            assert maillog.mark() is None
            assert path.read_text().splitlines()[-1].endswith(f"line {BATCH_LINES * 3 + 6}")
