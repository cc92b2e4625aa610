"""One smtpd worker's part in taking turns with the others on the shared listening
sockets (the session board, trimail.processes.board, says whose turn it is), for
net.listener.DeferredAccept.

Every connection wakes every worker that waits on a listening socket.  Under light
load the worker whose turn it is takes it at once and the others look again after
``DEFER_LIGHT``; a worker that does that for each of a lone client's connections
spends CPU (and a wake-up) on each, on the cores the client's worker needs: 0.08-0.19
ms per message on this 2-core VM, and a lone client was about 10 % faster with one
worker than with two.  So a worker with nothing to do on the sockets
(``SessionBoard.idle``) rests on the board's wake-up descriptor instead of watching
them (``rest``), and a worker that lets a pending connection wait for another's turn
waits on it too (``defer``): both look at the board again when signalled, which is
whenever the turn may have become theirs.  A resting worker also looks again after
``RECHECK`` seconds: a worker whose turn it is but which does not accept (stopped,
or its loop stuck) costs a connection at most that long.

Nobody reads the eventfd (its counter only grows; 2^64 signals is never).  Each
worker watches it through an epoll instance of its own, edge-triggered, so every
signal wakes every worker that waits, and each takes only its own notice of it
(``_seen``, before it looks at the board: a signal after that look wakes the wait).
Reading the counter instead would let one worker take the signal meant for another:
the first version did, and a worker deferring a connection took the signal that
should have woken the resting worker whose turn it was (20 sessions 20 / 0 under
CI load).
"""

from __future__ import annotations

import select

import trio

from trimail.processes.board import SessionBoard

RECHECK = 0.25  # seconds a resting worker waits at most before it watches the sockets again


class Turns:
    def __init__(self, board: SessionBoard) -> None:
        self.board = board
        self._woken: trio.Event | None = None  # set when the task waiting on the descriptor returns
        # this worker's view of the signals, for its lifetime (only workers with peers
        # take turns, and only their boards have the descriptor)
        assert board.wake is not None
        self._notices = select.epoll()
        self._notices.register(board.wake, select.EPOLLIN | select.EPOLLET)

    def _seen(self) -> None:
        """Take note of the signals given so far (before a look at the board)."""
        self._notices.poll(0)

    async def rest(self) -> None:
        """Return when this worker should watch the listening sockets: at once if it has
        something to do there, else when signalled or after RECHECK."""
        board = self.board
        if not board.idle():
            return
        self._seen()  # then look again: a signal after this look wakes the wait below
        if board.idle():
            await self._wait(RECHECK)

    async def defer(self) -> None:
        """Let a pending connection wait for the worker whose turn it is: return at once
        when the turn is this worker's, else once it has become this worker's or its
        delay (``SessionBoard.accept_delay``) has passed."""
        board = self.board
        delay = board.accept_delay()
        if not delay:
            return
        deadline = trio.current_time() + delay
        while True:
            self._seen()
            if board.my_turn():
                return
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                return
            await self._wait(remaining)

    async def _wait(self, timeout: float) -> None:
        """Until the board is signalled, or *timeout* seconds, or another of this
        worker's tasks stopped waiting (which can only make the caller look again
        early).  One task waits on the descriptor for all of them: trio lets only one."""
        with trio.move_on_after(timeout):
            if self._woken is not None:
                await self._woken.wait()
                return
            self._woken = woken = trio.Event()
            try:
                await trio.lowlevel.wait_readable(self._notices.fileno())
            finally:
                self._woken = None
                woken.set()
