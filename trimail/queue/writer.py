"""Group commit: serve's queue work on one dedicated thread, many requests per fsync.

SQLite work must never block the trio event loop, and one fsync per message would
cap throughput at the disk's sync rate.  So serve owns exactly one writing
connection, on a thread of its own.  Tasks ``await writer.run(fn, *args)``; the
thread takes the requests waiting (up to ``max_batch`` of a kind), runs them in one
``BEGIN IMMEDIATE`` transaction, each in its own SAVEPOINT (so one failing request
does not spoil the others), then COMMITs once (one WAL fsync) and only then wakes
the waiting tasks.  While one batch is being fsynced the next one fills up, so the
batch size follows the load by itself: one request when idle, dozens under load.

A task that is cancelled while waiting does not cancel its request: callers that
must answer a client after the commit (the SMTP session's ``250``) shield the wait
(``run_shielded``).

Durability is per request.  A message accepted from a client (``durable=True``,
the default) is answered only after its batch is committed and the WAL fsynced,
which the thread does itself after the COMMIT, outside SQLite's write lock, so
that other processes commit meanwhile (``queue.database``: the fsync outside the
lock; ``synchronous = FULL`` where that cannot be had).  The scheduler's
bookkeeping (claiming rows, recording outcomes, removing delivered mail, queueing
bounces) passes ``durable=False`` and commits in transactions of its own with
``synchronous = NORMAL``, which is just as atomic but leaves the fsync to the next
durable commit or checkpoint.  Durable requests never share a transaction with
bookkeeping: the thread runs the durable requests waiting first, then one slice of
bookkeeping (at most ``BOOKKEEPING_SLICE`` = 10 ms of requests, or ``max_batch``),
then durable again (the qmgr worker also leaves the lock free for ``share_lock``
seconds between slices, for the smtpd workers' commits), so a ``250`` waits for at
most one short slice of the scheduler's work, and a stream of accepted mail never
starves the scheduler either.  The WAL is one sequence, so a later fsync makes
every earlier commit durable too, and a crash can only roll the bookkeeping back to
a state that was true before: a message delivered again (as Postfix may after a
crash between delivery and unlink), never one lost.

The qmgr worker runs its bookkeeping in its event loop when the write lock is
free (``queue.inline.BookkeepingWriter``); the thread then only checkpoints for
those commits, when told to (``_DIRTY``, ``_CHECKPOINT``).  The thread's own
connection does not checkpoint inside a batch's COMMIT either: past the WAL's
limit the thread checkpoints after it answered the batch (``queue.checkpoints``).

Reads that need no write (a message's content while it is being delivered, the
queue counts for metrics) go through ``writer.read``: a few reading connections of
their own, on worker threads, each read in one snapshot, so a delivery never waits
behind an fsync of accepted mail.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

import apsw
import trio

from trimail.errors import StorageError
from trimail.queue.batch import Request as _Request
from trimail.queue.batch import commit_batch
from trimail.queue.checkpoints import WalWatch, checkpoint, under_load
from trimail.queue.database import storage_error
from trimail.queue.sched import no_wakeup_preemption
from trimail.queue.store import Store

log = logging.getLogger("trimail.queue")

T = TypeVar("T")

_STOP = object()
_DIRTY = object()  # a commit in the event loop happened (queue.inline): checkpoint when idle
_CHECKPOINT = object()  # commits in the event loop grew the WAL past their limit: checkpoint now
CHECKPOINT_IDLE = 10.0  # seconds without requests after which the WAL is checkpointed and truncated
RECOVER_PAUSE = 1.0  # seconds before the thread serves again after its loop failed (_recover)


def _in_snapshot(store: Store, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
    with store.read_snapshot():
        return fn(store, *args)


def _set_all(events: list[trio.Event]) -> None:
    for event in events:
        event.set()


@dataclasses.dataclass(slots=True)
class WriterStats:
    batches: int = 0
    durable_batches: int = 0
    requests: int = 0
    largest_batch: int = 0
    commit_seconds: float = 0.0


class QueueWriter:
    """Use as ``async with QueueWriter(open_store) as writer:``."""

    def __init__(self, open_store: Callable[[], Store], max_batch: int = 512, readers: int = 4,
                 share_lock: float = 0.0, readers_at_start: int | None = None) -> None:
        self._open_store = open_store
        self._dirty_told = False  # the thread knows of commits in the event loop since its last checkpoint
        self._checkpoint_asked = False
        self._stop_taken = False  # the thread took _STOP off the queue (_recover puts it back)
        self._stats_lock = threading.Lock()  # commits are counted in the event loop too (queue.inline)
        # seconds to leave the write lock free after a bookkeeping slice when more waits: other
        # processes (smtpd workers committing mail) get their turn instead of losing every race
        self._share_lock = share_lock
        self._max_batch = max_batch
        # idle reading connections, opened at start (__aenter__): all unless *readers_at_start*
        # says fewer (a test queue, which never changes hands or jails, opens them in read())
        self._readers: list[Store] = []
        self._read_limiter = trio.CapacityLimiter(readers)
        self._reader_count = readers if readers_at_start is None else min(readers, readers_at_start)
        self._dead: StorageError | None = None  # the thread ended unexpectedly, or the writer is closed
        self._checkpoint_idle = CHECKPOINT_IDLE
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._pending: tuple[deque[_Request], ...] = ()  # taken off the queue by the thread, not yet run
        self._thread: threading.Thread | None = None
        self._finished = trio.Event()  # set (from the thread, through the token) as the thread ends
        self._token: trio.lowlevel.TrioToken | None = None
        self.stats = WriterStats()
        self.on_commit: Callable[[int, float], None] | None = None  # (batch size, seconds), for metrics
        self.on_no_space: Callable[[], None] | None = None  # a commit found the file system full (queue.reserve)

    async def __aenter__(self) -> QueueWriter:
        self._token = trio.lowlevel.current_trio_token()
        opened = trio.Event()
        failure: list[BaseException] = []

        def report(error: BaseException | None) -> None:
            if error is not None:
                failure.append(error)
            opened.set()

        self._thread = threading.Thread(target=self._thread_main, args=(report,), name="trimail-queue-writer",
                                        daemon=True)
        self._thread.start()
        # The thread opens its connection and the readers' (one hand-over, not one per reader):
        # all now, before anything else could touch the file; a later open goes through SQLite alone.
        try:
            await opened.wait()
        except BaseException:  # cancelled while starting: the thread and the readers must not outlive us
            await self.__aexit__()
            raise
        if failure:
            await trio.to_thread.run_sync(self._thread.join)
            raise failure[0]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._dead = self._dead or StorageError("queue writer closed")  # a later run must not wait forever
        self._requests.put(_STOP)
        assert self._thread is not None
        with trio.CancelScope(shield=True):
            await self._finished.wait()  # no worker thread just to wait in join()
            self._thread.join()  # returns at once: the thread has nothing left to do
            for store in self._readers:
                store.close()
            self._readers.clear()

    async def read(self, fn: Callable[..., T], *args: Any, small: bool = False) -> T:
        """Run ``fn(store, *args)`` in one read snapshot on a reading connection, on a
        worker thread: never queued behind the writer's commits.  *small*: the caller
        knows the read is of a few pages (``queue.inline.BookkeepingWriter`` may then
        run it in the event loop)."""
        del small
        async with self._read_limiter:
            store = self._readers.pop() if self._readers else await trio.to_thread.run_sync(self._open_store)
            try:
                return await trio.to_thread.run_sync(_in_snapshot, store, fn, args)
            except (apsw.Error, OSError) as exc:
                raise storage_error(exc) from exc
            finally:
                self._readers.append(store)

    async def run(self, fn: Callable[..., T], *args: Any, durable: bool = True) -> T:
        """Run ``fn(store, *args)`` in the next group commit; return after COMMIT
        (fsynced unless *durable* is false: see the module's docstring)."""
        if self._dead is not None:
            raise self._dead
        return await self._hand_over(_Request(fn, args, durable))

    async def run_shielded(self, fn: Callable[..., T], *args: Any) -> T:
        """A durable ``run`` that cancellation does not interrupt (its caller answers after it)."""
        with trio.CancelScope(shield=True):
            return await self.run(fn, *args)

    async def _hand_over(self, request: _Request) -> Any:
        self._requests.put(request)
        await request.done.wait()
        return request.answer()

    def _tell(self, checkpoint: bool) -> None:
        """A commit in the event loop (queue.inline) happened: the thread checkpoints
        when idle, and at once when *checkpoint*."""
        if not self._dirty_told:
            self._dirty_told = True
            self._requests.put(_DIRTY)
        if checkpoint and not self._checkpoint_asked:
            self._checkpoint_asked = True
            self._requests.put(_CHECKPOINT)

    # -- the writer thread -----------------------------------------------------

    def _thread_main(self, report: Callable[[BaseException | None], None]) -> None:
        no_wakeup_preemption()
        try:
            self._main(report)
        finally:
            assert self._token is not None
            try:
                self._token.run_sync_soon(self._finished.set)
            except trio.RunFinishedError:
                pass

    def _main(self, report: Callable[[BaseException | None], None]) -> None:
        assert self._token is not None
        token = self._token
        try:
            store = self._open_store()
        except BaseException as exc:  # reported to __aenter__
            token.run_sync_soon(report, exc)
            return
        try:
            store.sync_commits_itself()
            watch = WalWatch(store)  # no checkpoint inside a batch's COMMIT (queue.checkpoints)
            for _ in range(self._reader_count):  # closed by __aexit__, which joins this thread first
                self._readers.append(self._open_store())
        except BaseException as exc:  # reported to __aenter__
            for opened in [*self._readers, store]:
                opened.close()
            self._readers.clear()
            token.run_sync_soon(report, exc)
            return
        token.run_sync_soon(report, None)
        batch: list[_Request] = []
        try:
            while True:
                try:
                    self._serve(store, token, batch, watch)
                    return
                except Exception as exc:  # noqa: BLE001 - the loop's own fault, not a request's
                    self._recover(store, token, batch, exc)
        except BaseException as exc:  # the thread must not die silently: waiters would hang
            log.critical("queue writer stopped: %s", exc, exc_info=exc)
            self._dead = StorageError(f"queue writer stopped: {exc}", temporary=False)
            self._fail_pending(token, batch)
        finally:
            try:
                store.close()
            except apsw.Error as exc:
                log.warning("closing the queue database: %s", exc)

    def _serve(self, store: Store, token: trio.lowlevel.TrioToken, batch: list[_Request], watch: WalWatch) -> None:
        dirty = False  # commits since the last checkpoint
        durable: deque[_Request] = deque()  # taken from the queue, not yet run
        bookkeeping: deque[_Request] = deque()
        self._pending = (durable, bookkeeping)
        stop = False
        while True:
            if not durable and not bookkeeping:
                if stop:
                    self._checkpoint(store)
                    return
                try:
                    first = self._requests.get(timeout=self._checkpoint_idle if dirty else None)
                except queue.Empty:
                    # a reader that kept it from finishing (a backup, a long listing) makes
                    # it try again after the next idle period, not only after new commits
                    dirty = not self._checkpoint(store)
                    continue
                if first is _STOP:
                    self._stop_taken = True
                    self._checkpoint(store)
                    return
                if first is _DIRTY or first is _CHECKPOINT:
                    dirty = self._inline_told(store, first) or dirty
                    continue
                (durable if first.durable else bookkeeping).append(first)
            while not stop and len(durable) + len(bookkeeping) < 4 * self._max_batch:
                try:
                    item = self._requests.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = self._stop_taken = True
                elif item is _DIRTY or item is _CHECKPOINT:
                    dirty = self._inline_told(store, item) or dirty
                else:
                    (durable if item.durable else bookkeeping).append(item)
            # Accepted mail first, in a transaction of its own: its 250 never waits
            # for the scheduler's bookkeeping that happened to queue up beside it ...
            if durable:
                batch[:] = [durable.popleft() for _ in range(min(len(durable), self._max_batch))]
                self._run_batch(store, batch)
                self._wake(token, batch)
                dirty = True
                watch.after_batch(store)  # a checkpoint after the batch's 250s, not inside its COMMIT
            # ... then one slice of bookkeeping (bounded in time), before the next
            # accepted mail gets its turn; each side always makes progress
            if bookkeeping:
                self._run_batch(store, batch, bookkeeping)
                self._wake(token, batch)
                dirty = True
                watch.after_batch(store)
                if self._share_lock and bookkeeping:
                    time.sleep(self._share_lock)

    def _inline_told(self, store: Store, item: object) -> bool:
        """The event loop committed (_DIRTY: True, the WAL wants a checkpoint when
        idle) or grew the WAL past its limit (_CHECKPOINT: checkpointed now)."""
        if item is _CHECKPOINT:  # never holding up the commits of others (queue.checkpoints)
            self._checkpoint_asked = False
            under_load(store)
        return item is _DIRTY

    def _wake(self, token: trio.lowlevel.TrioToken, batch: list[_Request]) -> None:
        """One call into the event loop for the whole batch (each wakes the loop with
        a write to its wake-up socket, and waits for the interpreter lock)."""
        done = [request.done for request in batch]
        token.run_sync_soon(_set_all, done)
        batch.clear()

    def _taken(self, batch: list[_Request]) -> list[_Request]:
        """The requests the thread took off the queue and has not answered: the batch
        under way and the ones waiting for their turn."""
        return [*batch, *(request for side in self._pending for request in side)]

    def _recover(self, store: Store, token: trio.lowlevel.TrioToken, batch: list[_Request], exc: Exception) -> None:
        """The loop failed outside any request (a bug, no memory): what it held gets a
        temporary error (sent again; if committed, delivered twice, never lost), and it
        serves on after ``RECOVER_PAUSE``, not dead until serve restarts."""
        log.critical("queue writer failed: %s; serving again in %g s", exc, RECOVER_PAUSE, exc_info=exc)
        held = self._taken(batch)
        for request in held:
            request.error = request.error or StorageError(f"queue writer failed: {exc}")
        self._wake(token, held)
        batch.clear()
        store.rollback()
        if self._stop_taken:
            self._requests.put(_STOP)
        time.sleep(RECOVER_PAUSE)

    def _fail_pending(self, token: trio.lowlevel.TrioToken, batch: list[_Request]) -> None:
        """After the thread failed: every request it took or that waits gets the error."""
        assert self._dead is not None
        pending = self._taken(batch)
        while True:
            try:
                item = self._requests.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Request):
                pending.append(item)
        for request in pending:
            request.error = request.error or self._dead
            try:
                token.run_sync_soon(request.done.set)
            except trio.RunFinishedError:
                pass

    def _checkpoint(self, store: Store) -> bool:
        """When idle: move the WAL into the database and truncate it (WAL hygiene:
        the WAL does not grow without bound and a backup copies less).  Whether it
        finished (False: a reader kept it from it, or it failed)."""
        self._dirty_told = False  # inline commits from now on tell again
        return checkpoint(store, "TRUNCATE")

    def _run_batch(self, store: Store, batch: list[_Request], source: deque[_Request] | None = None,
                   begun: bool = False) -> None:
        """Run *batch* in one transaction (*begun*: already begun); with *source*,
        take requests from it into the batch as they run, until ``max_batch`` or
        ``BOOKKEEPING_SLICE`` seconds."""
        started = time.monotonic()
        durable = commit_batch(store, batch, source, begun, self._max_batch, started, self.on_no_space)
        elapsed = time.monotonic() - started
        with self._stats_lock:
            stats = self.stats
            stats.batches += 1
            stats.durable_batches += durable
            stats.requests += len(batch)
            stats.largest_batch = max(stats.largest_batch, len(batch))
            stats.commit_seconds += elapsed
        if self.on_commit is not None:
            self.on_commit(len(batch), elapsed)  # prometheus_client is thread-safe

