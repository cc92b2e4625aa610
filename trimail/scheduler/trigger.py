"""The qmgr trigger: how an smtpd worker (or the master) wakes the queue manager
in another process, like Postfix's qmgr FIFO.

A ``SOCK_DGRAM`` socketpair made by the master: every sender holds one end, the
qmgr worker reads the other.  A trigger is one byte: ``W`` (new mail: run a
round now) or ``F`` (also forget the dead destinations: a flush or an ETRN).
Sending never blocks: when the qmgr is slow and the socket's buffer is full (a few
hundred triggers), a ``W`` is already pending and this one adds nothing.  An ``F``
is owed instead, and ``watch`` sends it as soon as there is room: a lost one would
leave the dead sites dead (the mail the flush made due is marked in the database
and finds its own destinations alive, however late the ``F``: scheduler/dead.py).
The database stays the source of truth (the mail was committed before the
trigger), so a lost trigger delays delivery by at most a round timer, never loses
mail; the master holds the reading end while the qmgr restarts, so triggers sent
meanwhile wait for it.

An smtpd worker wakes the qmgr about new mail only once its log lines about it
are written (``wake_after``, with ``trimail.log.mark``), so the qmgr's lines follow
them in the log; when the log destination stops moving, ``watch`` wakes it
``STUCK_AFTER`` seconds after the commit anyway.
"""

from __future__ import annotations

import socket
from collections import deque
from typing import Protocol

import trio

from trimail.log import STUCK_AFTER, Written

WAKE = b"W"
FLUSH = b"F"
FLUSH_RETRY = 0.01  # seconds between tries of an owed F


class QmgrTrigger:
    """Stands in for the Scheduler in a process that has none: ``reserve()`` is
    always False (no in-memory hand-over), ``wake()`` and ``forget_dead()`` send."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._late: deque[tuple[float, Written]] = deque()  # marks not reached at their commit, oldest first
        self._alarm = trio.Event()  # set when _late gets its first entry, or a flush is owed
        self._flush_owed = False  # an F the full socket did not take: watch sends it

    def wake_after(self, written: Written) -> None:
        """Wake the qmgr about mail just committed once the log lines before
        *written* (a ``log.mark``) are written -- now, or by the log writer thread --
        and ``STUCK_AFTER`` seconds from now at the latest (``watch``): a log
        destination that does not move delays the wake-up, never loses it."""
        if written.then(self.wake):
            return
        if not self._late:
            self._alarm.set()
        self._late.append((trio.current_time() + STUCK_AFTER, written))

    async def watch(self) -> None:
        """Until cancelled (a task of the smtpd worker): for a mark not reached by
        its deadline, wake the qmgr (once for all of them: a round claims every
        message committed so far)."""
        late = self._late
        while True:
            if self._flush_owed:
                if self._send(FLUSH):
                    self._flush_owed = False
                    self.wake()
                else:
                    await trio.sleep(FLUSH_RETRY)
                    continue
            if not late:
                await self._alarm.wait()
                self._alarm = trio.Event()
                continue
            deadline, written = late[0]
            if written.reached:
                late.popleft()
            elif trio.current_time() < deadline:
                await trio.sleep_until(deadline)
            else:
                late.clear()
                self.wake()

    def _send(self, byte: bytes) -> bool:
        """Whether the trigger went (False: the queue is full of ones the qmgr has
        yet to read); no reader at all (shutting down) counts as sent: the database
        says what is due."""
        try:
            self.sock.send(byte)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            pass
        return True

    def wake(self) -> None:
        self._send(WAKE)

    def forget_dead(self) -> None:
        if not self._send(FLUSH):
            self._flush_owed = True
            self._alarm.set()

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
