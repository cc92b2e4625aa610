"""The qmgr trigger: how an smtpd worker (or the master) wakes the queue manager
in another process, like Postfix's qmgr FIFO.

A ``SOCK_DGRAM`` socketpair made by the master: every sender holds one end, the
qmgr worker reads the other.  A trigger is one byte: ``W`` (new mail: run a
round now) or ``F`` (also forget the dead destinations: a flush or an ETRN).
Sending never blocks: when the qmgr is slow and the socket buffer is full, a
trigger is already pending and this one adds nothing.  The database stays the
source of truth (the mail was committed before the trigger), so a lost trigger
delays delivery by at most a round timer, never loses mail; the master holds the
reading end while the qmgr restarts, so triggers sent meanwhile wait for it.

An smtpd worker wakes the qmgr about a new message only once its own log lines
about it (``client=``, ``message-id=``) are written (``wake_after_log``): the
qmgr logs about the message a millisecond later from another process, and its
lines must not reach the log first (pflogsumm and people read the log in order).
The log writer thread sends that trigger itself when it has written the lines
before its mark (``log.mark_written``), so the session neither waits for the
writer nor is woken by it; ``watch_log_order`` sends it anyway when the writer has
not got there within ``LOG_ORDER_WAIT``: a stuck log destination delays no mail.
"""

from __future__ import annotations

import socket
from typing import Protocol

import trio

from trimail import log as maillog

WAKE = b"W"
FLUSH = b"F"
LOG_ORDER_WAIT = 0.05  # seconds the qmgr's wake-up may wait for this process's log lines to be written


class QmgrTrigger:
    """Stands in for the Scheduler in a process that has none: ``reserve()`` is
    always False (no in-memory hand-over), ``wake()`` and ``forget_dead()`` send."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.log_marks = 0  # wake-ups left to the log writer (wake_after_log) ...
        self.log_marks_done = 0  # ... and sent by it (its thread: one writer of each counter)
        self._log_marked = trio.Event()  # a mark since watch_log_order last looked

    def _send(self, byte: bytes) -> None:
        try:
            self.sock.send(byte)
        except (BlockingIOError, InterruptedError):
            pass  # the buffer is full of triggers the qmgr has yet to read
        except OSError:
            pass  # no reader at all (shutting down): the database says what is due

    def wake(self) -> None:
        self._send(WAKE)

    def forget_dead(self) -> None:
        self._send(FLUSH)

    def wake_after_log(self) -> None:
        """Wake the qmgr once the lines this process logged so far are written: from
        the log writer thread, or now when there is none (see the module's docstring)."""
        if maillog.mark_written(self._logged):
            self.log_marks += 1
            if not self._log_marked.is_set():
                self._log_marked.set()
        else:
            self.wake()

    def _logged(self) -> None:  # the log writer thread
        self.log_marks_done += 1
        self.wake()

    async def watch_log_order(self) -> None:
        """Wake the qmgr when marks are still not done ``LOG_ORDER_WAIT`` after they were
        made (the log destination is stuck); asleep while no mark is made."""
        while True:
            await self._log_marked.wait()
            self._log_marked = trio.Event()
            made = self.log_marks
            await trio.sleep(LOG_ORDER_WAIT)
            if self.log_marks_done < made:
                self.wake()

    def reserve(self) -> bool:
        return False

    def release(self) -> None:  # pragma: no cover - reserve() never succeeds
        raise AssertionError("nothing was reserved")

    def hand_over(self, message: object, content: object) -> None:  # pragma: no cover
        raise AssertionError("no hand-over between processes")


class Wakeable(Protocol):
    def wake(self) -> None: ...
    def forget_dead(self) -> None: ...


async def receive_triggers(sock: socket.socket, scheduler: Wakeable) -> None:
    """The qmgr side: act on every trigger until cancelled; a burst of them is
    one wake-up."""
    sock.setblocking(False)
    while True:
        await trio.lowlevel.wait_readable(sock)
        received = flush = False
        while True:  # everything already waiting: one wake for the burst
            try:
                data = sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                break
            received = True
            flush = flush or FLUSH in data
        if flush:
            scheduler.forget_dead()
        if received:
            scheduler.wake()
