"""Queue writers that commit in the event loop's thread, where that costs less.

``QueueWriter`` (``queue/writer.py``) runs every commit on a thread of its own, so
that no fsync and no wait for SQLite's write lock ever stalls the event loop.  The
two hand-overs per request (to the thread and back) cost CPU of their own: on this
machine 150-200 µs per request, more than the SQL of a small request.  Two places
need no such protection:

- ``InlineWriter``: a test queue (trimail.testing, ``synchronous = OFF``, one
  process): no commit ever waits for the disk or for another process.
- ``BookkeepingWriter``: the qmgr worker's.  Its event loop holds no SMTP
  session, and its requests are bookkeeping (claims, outcomes, removals), which
  never fsync (``synchronous = NORMAL``).  Such a request runs at once in the loop,
  on a writing connection of its own, when SQLite's write lock is free at once
  (``BEGIN IMMEDIATE`` with no busy wait).  When another writer holds it (an smtpd
  worker committing accepted mail, while it appends to the WAL) the request waits
  in the loop without stopping it: a system task tries the lock again after a
  timer (``LOCK_RETRY``, doubling to ``LOCK_RETRY_MAX``) and then runs the waiting
  requests in turn, as many as one slice takes, in one transaction; later
  bookkeeping queues behind them, so requests commit in the order they were made.
  Durable requests always go to the thread, and so does all bookkeeping, and
  the small reads, for ``SLOW_BACKOFF`` (5 s) after a BEGIN or read in the loop
  took longer than ``SLOW`` (10 ms): SQLite may retry the WAL index's locks by
  itself for about 10 s while another process recovers the WAL, and the loop
  must not stop for each request meanwhile.  Measured in the 1-session
  end-to-end bench: the qmgr worker's CPU per message fell from 2.1 to 1.5-1.8 ms
  with the inline commits; with a connection reused for every message, half the
  requests still found the lock busy and went to the thread, each paying both
  hand-overs and the busy handler's sleeps on the interpreter lock, until they
  waited in the loop instead (1.9 -> 1.6 ms, medians of 8 alternating runs on a
  loaded machine).

The qmgr reads a message's content on that connection too, in the loop, when it
is small (``SMALL_READ``, 256 KiB, per read): a reader never waits for a lock in
WAL mode and mail just queued is in the page cache, so the two hand-overs to a
reading thread cost more than the read (1-session end-to-end bench, one message
per connection, 3 alternating pairs: the qmgr worker's CPU per message 1.55 ->
1.25 ms, with 64 KiB).  At 256 KiB a 100 KiB message is read in the loop too: the
qmgr worker draining 2,000 of them took 0.72-0.86 ms of CPU a message against
1.00-1.32 (5 alternating pairs), and a cached read of 256 KiB holds the loop about
40 us (1 MiB: 110 us; one from a cold disk longer).

That connection never checkpoints by itself: a checkpoint fsyncs the database and
may take milliseconds.  Its WAL hook tells the thread instead, which checkpoints
when it is idle, as after its own commits, and at once when the WAL has grown
past SQLite's own automatic checkpoint size (``queue.checkpoints``).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

import apsw
import trio

from trimail.errors import StorageError
from trimail.queue.batch import Request as _Request
from trimail.queue.checkpoints import AUTOCHECKPOINT_PAGES
from trimail.queue.database import storage_error
from trimail.queue.store import Store
from trimail.queue.writer import QueueWriter

T = TypeVar("T")

SMALL_READ = 256 << 10  # bytes of content the qmgr reads in its event loop (BookkeepingWriter.read)
LOCK_RETRY = 0.0005  # seconds before bookkeeping tries a busy write lock again ...
LOCK_RETRY_MAX = 0.002  # ... doubling up to this (trio's timers wake at best each millisecond)
SLOW = 0.01  # seconds: a wait in the loop slower than this sends the next requests to threads ...
SLOW_BACKOFF = 5.0  # ... for this long (LoopStalls)

log = logging.getLogger("trimail.queue")


async def _checkpoint_after() -> None:
    """The schedule point of a request that ran at once, after it ran, never before:
    requests run in the order they are made.  Yielding first let a later request
    (the last job of a message, finishing it) run before an earlier one (another
    job's outcomes), which then found its recipients still pending."""
    await trio.lowlevel.cancel_shielded_checkpoint()


class LoopStalls:
    """When an event loop last waited too long inside SQLite: after a BEGIN, a read
    or a commit in the loop that took longer than ``SLOW``, or a BEGIN that failed
    other than busy, the writer's requests go to its threads for ``SLOW_BACKOFF``.
    A BEGIN can be slow although the busy timeout is 0: while another process holds
    the WAL index's read locks (it runs WAL recovery) SQLite retries starting a
    read by itself, sleeping, for up to about 10 s before SQLITE_PROTOCOL, and
    nothing makes that retry loop return at once; so the loop waits for it at most
    once per back-off.  Used by BookkeepingWriter and queue.solo.SmtpdWriter."""

    __slots__ = ("until",)

    def __init__(self) -> None:
        self.until = 0.0  # trio time until which requests go to the threads

    def backing_off(self) -> bool:
        return trio.current_time() < self.until

    def note(self, started: float, failed: bool = False) -> None:
        """After a wait in the loop that began at *started* (``time.monotonic()``)."""
        if failed or time.monotonic() - started > SLOW:
            self.until = trio.current_time() + SLOW_BACKOFF


def open_inline(writer: QueueWriter, durable: bool) -> Store:
    """A writing connection for the event loop's thread: it never waits inside SQLite
    for the write lock (busy timeout 0: its caller decides what to do when the lock is
    busy), and never checkpoints by itself (its WAL hook tells *writer*'s thread)."""
    store = writer._open_store()
    store.db.set_busy_timeout(0)
    if durable:
        store.sync_commits_itself()  # its caller fsyncs after the COMMIT (QueueWriter._run_batch)
    store.set_durable(durable)

    def committed(connection: apsw.Connection, name: str, pages: int) -> int:
        del connection, name
        writer._tell(checkpoint=pages >= AUTOCHECKPOINT_PAGES)
        return apsw.SQLITE_OK

    store.db.set_wal_hook(committed)  # replaces its automatic checkpoints
    return store


class BookkeepingWriter(QueueWriter):
    """The qmgr worker's writer: bookkeeping in the event loop, where it also waits
    for the write lock when another process holds it."""

    def __init__(self, open_store: Callable[[], Store], **options: Any) -> None:
        super().__init__(open_store, **options)
        self._inline: Store | None = None
        self._waiting: deque[_Request] = deque()  # bookkeeping waiting for the write lock, in turn
        self._stalls = LoopStalls()
        self._handed = 0  # how many of the first waiting requests are with the thread (backing off)

    async def __aenter__(self) -> QueueWriter:
        await super().__aenter__()
        try:
            self._inline = await trio.to_thread.run_sync(self._open_inline)
        except BaseException:
            await self.__aexit__()
            raise
        return self

    def _open_inline(self) -> Store:
        return open_inline(self, durable=False)  # _wait_for_lock waits for the lock, in the loop

    async def __aexit__(self, *exc_info: object) -> None:
        await super().__aexit__(*exc_info)
        inline, self._inline = self._inline, None
        if inline is not None:
            inline.close()
        self._fail_waiting(StorageError("queue writer stopped", temporary=False))

    async def read(self, fn: Callable[..., T], *args: Any, small: bool = False) -> T:
        """A *small* read (a message's content of up to ``SMALL_READ`` bytes, as the
        qmgr sends it) runs at once in the event loop on the inline connection: a
        reader never waits for a lock in WAL mode, and the pages of mail just
        queued are in the page cache; the other reads, and a small one that finds
        the WAL index busy for a moment, go to a reading thread as in QueueWriter."""
        store = self._inline
        if not small or store is None or self._stalls.backing_off():
            return await super().read(fn, *args)
        await trio.lowlevel.checkpoint_if_cancelled()
        started = time.monotonic()
        try:
            with store.read_snapshot():
                answer = fn(store, *args)
        except apsw.BusyError:
            store.rollback()
            self._stalls.note(started)
            return await super().read(fn, *args)
        except (apsw.Error, OSError) as exc:
            store.rollback()
            self._stalls.note(started)
            raise storage_error(exc) from exc
        self._stalls.note(started)
        await _checkpoint_after()
        return answer

    async def run(self, fn: Callable[..., T], *args: Any, durable: bool = True) -> T:
        if durable or self._inline is None:
            return await super().run(fn, *args, durable=durable)
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._dead is not None:
            raise self._dead
        request = _Request(fn, args, durable)
        if not self._waiting and not self._stalls.backing_off() and self._run_inline(request):
            await _checkpoint_after()
            return request.answer()  # type: ignore[no-any-return]
        # the lock is busy, or earlier bookkeeping waits for it, or the loop backs off:
        # later bookkeeping must not overtake earlier (one message's jobs record their
        # outcomes in turn, and the last one's finish must see the others': a
        # recipient still pending there would be delivered again)
        self._waiting.append(request)
        if len(self._waiting) == 1:
            trio.lowlevel.spawn_system_task(self._wait_for_lock, name="trimail queue: waiting for the write lock")
        await request.done.wait()  # a caller cancelled meanwhile does not cancel its request (as QueueWriter)
        return request.answer()  # type: ignore[no-any-return]

    def _run_inline(self, request: _Request) -> bool:
        """Run *request* now, in the event loop's thread, if the write lock is free at
        once; False (nothing done) when it is not, or the connection cannot begin."""
        store = self._inline
        if store is None:  # closed meanwhile (stop)
            return False
        started = time.monotonic()
        try:
            store.db.execute("BEGIN IMMEDIATE")
        except apsw.Error as exc:  # busy: another writer holds the lock; anything else _wait_for_lock reports
            store.rollback()
            self._stalls.note(started, failed=not isinstance(exc, apsw.BusyError))
            return False
        self._stalls.note(started)
        self._run_batch(store, [request], begun=True)
        return True

    async def _wait_for_lock(self) -> None:
        """A system task while bookkeeping waits: try the write lock again after
        ``LOCK_RETRY`` (doubling to ``LOCK_RETRY_MAX``) and run the waiting requests
        in turn, one slice (``BOOKKEEPING_SLICE``, ``max_batch``) per transaction,
        leaving the lock free for ``share_lock`` between slices, until none waits.
        When the lock stays busy past the busy timeout, or BEGIN fails otherwise,
        the waiting requests fail, as the thread's batch would.  Nothing escapes: a
        system task's error would end the process."""
        waiting = self._waiting
        delay, since = LOCK_RETRY, trio.current_time()
        try:
            while waiting:
                if self._stalls.backing_off():  # the thread runs them, in turn, then the next ones
                    if self._dead is not None:
                        self._fail_waiting(self._dead)
                        return
                    # they stay in _waiting until committed: a later request must queue
                    # behind them even if the back-off ends while the thread still has them
                    handed = list(waiting)
                    self._handed = len(handed)
                    for request in handed:
                        self._requests.put(request)
                    await handed[-1].done.wait()  # the thread runs bookkeeping first in, first out
                    for _ in handed:
                        waiting.popleft()
                    self._handed = 0
                    continue
                await trio.sleep(delay)
                store = self._inline
                if store is None:  # stopped: __aexit__ failed the waiting requests
                    return
                started = time.monotonic()
                try:
                    store.db.execute("BEGIN IMMEDIATE")
                except apsw.Error as exc:
                    store.rollback()
                    self._stalls.note(started)
                    if isinstance(exc, apsw.BusyError) and trio.current_time() - since < store.busy_timeout:
                        delay = min(2 * delay, LOCK_RETRY_MAX)
                        continue
                    self._fail_waiting(storage_error(exc))  # as the thread's batch would fail
                    return
                self._stalls.note(started)
                batch = [waiting.popleft()]
                self._run_batch(store, batch, waiting or None, begun=True)
                for request in batch:
                    request.done.set()
                delay, since = max(self._share_lock, LOCK_RETRY), trio.current_time()
        except trio.Cancelled:  # the run ends: nobody may wait forever
            self._fail_waiting(StorageError("queue writer stopped", temporary=False))
            raise
        except Exception as exc:  # a bug: logged, and the waiting requests fail
            log.critical("queue writer: waiting for the write lock failed: %s", exc, exc_info=exc)
            self._fail_waiting(StorageError(f"queue writer failed: {exc}", temporary=False))

    def _fail_waiting(self, error: StorageError) -> None:
        """Fail the waiting requests, but those handed to the thread (it answers them)."""
        waiting = self._waiting
        while len(waiting) > self._handed:
            request = waiting.pop()
            request.error = request.error or error
            request.done.set()


class InlineWriter(QueueWriter):
    """A test queue's writer (trimail.testing, ``synchronous = OFF``: no commit ever
    waits for the disk): each request runs at once, in the event loop's thread, in a
    transaction of its own.  No thread to start and stop and no hand-over per commit,
    which on a test queue cost more than the commits themselves.

    Never for a real queue: there, a commit waits for fsync, or for the write lock
    that another process holds, and that would stall every session of the loop.
    A request is a cancellation point but no schedule point: its caller's next read
    or write is one.
    Reads still go through ``read`` (reading connections on worker threads)."""

    _store: Store | None = None

    async def __aenter__(self) -> QueueWriter:
        self._store = self._open_store()
        try:
            for _ in range(self._reader_count):
                self._readers.append(self._open_store())
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        store, self._store = self._store, None
        for opened in [*self._readers, *([store] if store is not None else [])]:
            opened.close()
        self._readers.clear()
        self._dead = self._dead or StorageError("queue writer stopped", temporary=False)

    async def run(self, fn: Callable[..., T], *args: Any, durable: bool = True) -> T:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._dead is not None or self._store is None:
            raise self._dead or StorageError("queue writer stopped", temporary=False)
        request = _Request(fn, args, durable)
        self._run_batch(self._store, [request])
        # no schedule point after it (a pass of the run loop per captured message): what
        # asks next is network I/O that yields anyway (a session's next read, a delivery)
        return request.answer()  # type: ignore[no-any-return]
