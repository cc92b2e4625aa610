"""The mail log's writer thread (trimail.log)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import trio

from trimail import log as maillog
from trimail.scheduler.trigger import QmgrTrigger


@contextlib.contextmanager
def logging_to(destination: io.StringIO) -> Iterator[None]:
    """setup() to *destination*; the ``trimail`` logger is put back afterwards."""
    root = logging.getLogger("trimail")
    saved = list(root.handlers), root.level, root.propagate
    maillog.setup("mx.test.example", stream=destination)
    try:
        yield
    finally:
        maillog.shutdown(timeout=1)
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
        root.propagate = saved[2]


@pytest.fixture
def stream():
    """setup() to a counting stream."""
    counting = CountingStream()
    with logging_to(counting):
        yield counting


@pytest.fixture
def held():
    """setup() to a destination that writes nothing until released (a stuck pipe)."""
    stuck = HeldStream()
    try:
        with logging_to(stuck):
            yield stuck
    finally:
        stuck.released.set()


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


class HeldStream(CountingStream):
    def __init__(self) -> None:
        super().__init__()
        self.released = threading.Event()

    def write(self, text: str) -> int:
        self.released.wait(30)
        return super().write(text)


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


# -- the qmgr's wake-up after this process's lines (scheduler.trigger.QmgrTrigger.wake_after_log) --

def test_the_qmgr_is_woken_by_the_log_writer_only_once_the_lines_before_are_written(held):
    sending, receiving = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    trigger = QmgrTrigger(sending)
    logging.getLogger("trimail.smtpd").info("4ABC: client=client.example[192.0.2.1]")
    trigger.wake_after_log()
    assert select.select([receiving], [], [], 0.3)[0] == []  # the line is not written yet: no wake-up
    held.released.set()
    assert select.select([receiving], [], [], 10)[0] == [receiving]
    assert "4ABC: client=client.example" in held.text()  # written before the wake-up was sent
    assert receiving.recv(16) == b"W"
    assert trigger.log_marks == trigger.log_marks_done == 1


async def test_a_stuck_log_destination_delays_the_wake_up_by_log_order_wait_only(held):
    sending, receiving = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    trigger = QmgrTrigger(sending)
    logging.getLogger("trimail.smtpd").info("4ABD: client=client.example[192.0.2.1]")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trigger.watch_log_order)
        began = trio.current_time()
        trigger.wake_after_log()
        with trio.fail_after(5):
            await trio.lowlevel.wait_readable(receiving)
        nursery.cancel_scope.cancel()
    assert trio.current_time() - began >= 0.04  # LOG_ORDER_WAIT: the writer was given its chance
    assert "4ABD" not in held.text()  # still stuck: the watchdog sent it
    assert receiving.recv(16) == b"W"


def test_without_a_log_writer_the_qmgr_is_woken_at_once():
    assert maillog._listener is None  # noqa: SLF001 - lines go straight to their destination
    sending, receiving = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    trigger = QmgrTrigger(sending)
    trigger.wake_after_log()
    assert receiving.recv(16, socket.MSG_DONTWAIT) == b"W"
