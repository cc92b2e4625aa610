"""The smtpd worker's writer: a message commits in the event loop when its session
is the worker's only one.

``QueueWriter`` commits on a thread of its own so that no fsync stalls the event
loop's other sessions, and so that the messages of many sessions share one fsync.
With a single session open neither holds: there is nobody to stall and nobody to
share with, and the two hand-overs (to the thread and back, with the interpreter
lock passed each way) are a fixed cost on that message's ``250``.  Measured per
step at the end of DATA with one client (1 KiB, this 2-core machine): the
hand-over to the thread 99 us and the wake-up back 142 us, beside 521 us of
COMMIT and fsync.  Postfix's cleanup, one process per message, fsyncs in line.

So ``SmtpdWriter.run`` commits a durable request right away, in the event loop's
thread, on a connection of its own (``queue.inline.open_inline``: no busy wait,
the WAL fsynced after the COMMIT, outside the write lock, as on the thread;
checkpoints left to the thread), when all of this holds:

- the worker has at most one session (``alone``, set by the worker to ask its
  ``Server``): a second session's commands would wait for the fsync;
- no request of this worker is with the thread (the order of commits stays the
  order of the requests, and a batch under way is not raced for the lock);
- the write lock is free at once (``BEGIN IMMEDIATE`` with no busy wait): another
  process's commit (the other smtpd worker, the qmgr's bookkeeping) sends the
  request to the thread, whose busy handler waits for the lock off the loop;
- the content is in memory (a message spilled to a file reads that file) and at
  most ``INLINE_CONTENT`` (256 KiB, the spool's memory limit) long.  It was 64 KiB
  once, after 100 KiB messages committed in the loop had gained nothing and cost
  the worker 5-10 % more CPU (accept, one session, three alternating triples, on
  this VM when it was slower).  Measured again (2026-12-04, alternating pairs of
  1,500 messages, 1 session, 100 KiB): end to end one message per connection 4 of
  5 pairs faster with 256 KiB than with 64 KiB (median 1.06x, CPU per message lower
  in 4 of 5), with reuse 1.04x (2 of 4 faster, 1 equal), accept one message per
  connection 1.05x (3 of 3): the two hand-overs are on the lone client's path,
  and the commit of 100 KB (0.3-0.4 ms) in the loop stops nobody else;
- the last commit in the loop took less than ``inline.SLOW`` (10 ms; here a
  commit takes 0.8 ms at the median, 2.3 ms at the 99th percentile): on a slow or
  overloaded disk the loop must not stop for each fsync, so for ``inline.SLOW_BACKOFF``
  (5 s) after such a commit, or after a BEGIN that took as long or failed other
  than busy, everything goes to the thread again.  One such wait can still stop
  the loop: SQLite retries taking the WAL index's read locks by itself, for up to
  about 10 s, while another process recovers the WAL (``inline.LoopStalls``).

While the loop waits for the fsync the interpreter lock is free (SQLite and
``os.fdatasync`` run without it), so the mail log's thread writes the message's
lines meanwhile.  Durability is the same as on the thread: ``run`` returns after
the COMMIT and the WAL's fsync.

Measured end to end (1 KiB, one session, 2 smtpd workers, 1,500 messages, 6
alternating pairs against the writer thread alone): one message per connection
299 -> 337 msg/s, the smtpd worker's CPU per message 2.44 -> 2.21 ms; with the
connection reused 491 -> 582 msg/s, 1.33 -> 1.14 ms.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import apsw
import trio

from trimail.queue.batch import Request as _Request
from trimail.queue.inline import LoopStalls, open_inline
from trimail.queue.store import NewMessage, Store
from trimail.queue.writer import QueueWriter

T = TypeVar("T")

INLINE_CONTENT = 256 << 10  # bytes of content at most that a message may have to commit in the loop


class SmtpdWriter(QueueWriter):
    """``QueueWriter`` that commits in the event loop while its session is alone."""

    def __init__(self, open_store: Callable[[], Store], **options: Any) -> None:
        super().__init__(open_store, **options)
        self._inline: Store | None = None
        self.alone: Callable[[], bool] = lambda: False  # the worker's Server: at most one session?
        self._with_thread = 0  # requests handed to the thread, not yet answered
        self._stalls = LoopStalls()  # a slow commit or BEGIN in the loop: the thread's turn for a while

    async def __aenter__(self) -> QueueWriter:
        await super().__aenter__()
        try:
            self._inline = await trio.to_thread.run_sync(open_inline, self, True)
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await super().__aexit__(*exc_info)
        inline, self._inline = self._inline, None
        if inline is not None:
            inline.close()

    async def run(self, fn: Callable[..., T], *args: Any, durable: bool = True) -> T:
        done = self._in_loop(fn, args, durable)
        if done is not None:
            return done.answer()  # type: ignore[no-any-return]
        return await self._on_thread(fn, args, durable)

    async def run_shielded(self, fn: Callable[..., T], *args: Any) -> T:
        """A commit in the loop has no wait to shield: the shielded scope (6 us) only
        for the thread's."""
        done = self._in_loop(fn, args, True)
        if done is not None:
            return done.answer()  # type: ignore[no-any-return]
        with trio.CancelScope(shield=True):
            return await self._on_thread(fn, args, True)

    def _in_loop(self, fn: Callable[..., Any], args: tuple[Any, ...], durable: bool) -> _Request | None:
        """The request, run now in the loop, or None when it is the thread's."""
        if self._dead is None and self._may_run_inline(args):
            request = _Request(fn, args, durable)
            if self._run_inline(request):
                return request
        return None

    async def _on_thread(self, fn: Callable[..., T], args: tuple[Any, ...], durable: bool) -> T:
        self._with_thread += 1
        try:
            return await super().run(fn, *args, durable=durable)
        finally:
            self._with_thread -= 1

    def _may_run_inline(self, args: tuple[Any, ...]) -> bool:
        if self._inline is None or self._with_thread or self._stalls.backing_off():
            return False
        if any(isinstance(arg, NewMessage) and (not arg.content.in_memory or arg.content.size > INLINE_CONTENT)
               for arg in args):
            return False  # large, or spilled to a file (reading it may wait for the disk)
        return self.alone()

    def _run_inline(self, request: _Request) -> bool:
        """Run *request* now, in the event loop's thread, if the write lock is free at
        once; False (nothing done) when it is not, or the connection cannot begin."""
        store = self._inline
        assert store is not None
        started = time.monotonic()  # before BEGIN: even a BEGIN that fails may take long (inline.LoopStalls)
        try:
            store.db.execute("BEGIN IMMEDIATE")
        except apsw.Error as exc:  # busy (another process commits), or failing: the thread's turn
            store.rollback()
            self._stalls.note(started, failed=not isinstance(exc, apsw.BusyError))
            return False
        self._run_batch(store, [request], begun=True)
        self._stalls.note(started)  # the BEGIN and the commit with its fsync
        return True

