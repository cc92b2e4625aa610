"""The mail log's writer thread and the queue it reads (trimail.log says how they
are used): ``BoundedQueueHandler`` puts records on the queue, ``Writer`` takes them
off and writes them, ``Written`` is a mark among them."""

from __future__ import annotations

import logging
import logging.handlers
import queue
import threading
import time
from collections.abc import Callable

from trimail.log.destinations import MailLogFile

MAX_QUEUED_LINES = 10_000
BATCH_LINES = 512  # lines written together at most (one write() for the lines waiting)
BATCH_WAIT = 0.01  # seconds the writer rests after a write (so a line may wait this long to be written)
FLUSH_TIMEOUT = 5.0


class BoundedQueueHandler(logging.handlers.QueueHandler):
    """Never blocks the logging thread: past the bound, a line is dropped and counted."""

    def __init__(self, bound: int) -> None:
        # a SimpleQueue: put() is one C call without a Condition to notify (a
        # queue.Queue's put cost the event loop 6% of its time under a retry storm)
        super().__init__(queue.SimpleQueue())
        self.bound = bound
        self.dropped = 0
        self.writer: Writer | None = None

    def handle(self, record: logging.LogRecord) -> bool:  # type: ignore[override]
        """``Handler.handle`` without the lock: ``emit`` only puts on a thread-safe queue."""
        if self.filters:
            return bool(super().handle(record))
        self.emit(record)
        return True

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        """``QueueHandler.prepare`` without its copy (made for later handlers: this is
        the last one, ``trimail`` does not propagate); a traceback takes its way."""
        if record.exc_info or record.stack_info:
            return super().prepare(record)
        record.message = record.msg = record.getMessage()  # merged now: the arguments may change later
        record.args = record.exc_text = None
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        if self.queue.qsize() >= self.bound:
            self.dropped += 1
        else:
            writer = self.writer
            if writer is None:
                self.queue.put_nowait(record)
            else:
                writer.put(record)


class Written:
    """A mark in the writer's queue (``mark``), put before a commit: the writer thread
    arrives once every line logged before it has been written, the committer once its
    commit is done (``then``); whichever of the two comes second calls ``done``."""

    __slots__ = ("done", "_turns")

    def __init__(self) -> None:
        self.done: Callable[[], None] | None = None
        self._turns = [True, False]  # list.pop() is atomic: the second to arrive gets True

    def arrive(self) -> bool:
        """Whether the other side has arrived already (then this one calls ``done``)."""
        return self._turns.pop()

    def then(self, done: Callable[[], None]) -> bool:
        """The committer's side: call *done* now if the lines are written (True), else
        the writer thread calls it once they are (False)."""
        self.done = done
        if self.arrive():
            done()
            return True
        return False

    @property
    def reached(self) -> bool:
        """Both sides have arrived: ``done`` has been called (or is being called)."""
        return not self._turns


class Writer(logging.handlers.QueueListener):
    """The thread that formats and writes; says how many lines were dropped once
    it has caught up, and stops within a deadline."""

    def __init__(self, source: BoundedQueueHandler, target: logging.Handler) -> None:
        super().__init__(source.queue, target)
        self.source = source
        self.target = target
        self._told = 0
        self.marked_since = 0.0  # monotonic time the oldest mark not yet reached was put (0: none)
        self.hurry = threading.Event()  # ends the rest after a write: see mark()
        # Whoever takes lines from the queue holds the lock until they are written, so
        # lines reach the destination in the order they were logged.  So the thread does
        # not wait in the queue's get() (it would hold a line without the lock) but on a
        # bell, rung by a put while it sleeps.
        self.lock = threading.Lock()
        self.bell: queue.SimpleQueue[None] = queue.SimpleQueue()
        self.sleeping = False
        source.writer = self

    @property
    def direct(self) -> bool:
        """Whether a committer may write the lines itself (``log.write_waiting``): the
        destination's stream never waits for a reader (``destinations._Batched``; not
        syslog), and the path was not moved (the writer thread reopens it: opening can
        wait).  The stream is asked again under ``lock``: the writer thread may reopen
        meanwhile."""
        target = self.target
        quick = getattr(target, "never_waits", None)
        return quick is not None and quick() and not (isinstance(target, MailLogFile) and target.moved())

    def put(self, item: object) -> None:
        """Queue a line or a mark, and wake the thread if it sleeps (after the put:
        see ``_monitor``)."""
        self.queue.put_nowait(item)
        if self.sleeping:
            self.sleeping = False
            self.bell.put_nowait(None)

    def _monitor(self) -> None:
        """Write the lines waiting (up to ``BATCH_LINES``) together, then rest unless the
        batch was full (a put() meanwhile wakes nobody); stop at the sentinel.  Asleep
        only when nothing waits: a put sees ``sleeping`` after it put (enqueue), this
        thread sees the queue after it set it (the interpreter orders the two)."""
        q = self.queue
        while True:
            self.sleeping = True
            if q.empty():
                self.bell.get()
            self.sleeping = False
            with self.lock:
                stop, full = self.take_and_write(in_thread=True)
            if stop:
                return
            if not full:
                self.hurry.wait(BATCH_WAIT)
                self.hurry.clear()

    def take_and_write(self, in_thread: bool) -> tuple[bool, bool]:
        """Take the lines waiting (up to ``BATCH_LINES``) and write them, and arrive at
        the marks among them (the caller holds ``lock``); (whether the sentinel was
        reached, whether the batch was full).  Only the thread stops at the sentinel:
        another caller puts it back."""
        q = self.queue
        records = []
        while len(records) < BATCH_LINES:
            try:
                records.append(q.get_nowait())
            except queue.Empty:
                break
        full = len(records) >= BATCH_LINES
        stop = self._sentinel in records  # None: no record compares equal to it
        if stop:
            del records[records.index(self._sentinel):]
            if not in_thread:
                q.put_nowait(self._sentinel)  # the last item (shutdown put it after every line)
                self.bell.put_nowait(None)
                stop = False
        marks = [r for r in records if type(r) is Written]
        if marks:
            records = [r for r in records if type(r) is not Written]
        if records:
            self.write(records, reopen=in_thread)
        if marks:
            self.marked_since = 0.0  # (a mark put meanwhile is dated by the next one)
            for mark in marks:
                if mark.arrive():
                    mark.done()  # type: ignore[misc]
        return stop, full

    def write(self, records: list[logging.LogRecord], reopen: bool = True) -> None:
        """Write *records* (the caller holds ``lock``); a moved ``maillog_file`` is
        reopened first only when *reopen* (the writer thread's write, never a
        committer's: the lines go into the moved file then)."""
        target = self.target
        emit_many = getattr(target, "emit_many", None)
        if emit_many is None or target.filters:  # syslog: one datagram per line
            for record in records:
                self.handle(record)
        else:
            target.acquire()
            try:
                emit_many(records, reopen)
            finally:
                target.release()
        dropped = self.source.dropped
        if dropped > self._told and self.queue.empty():
            record = logging.LogRecord("trimail.master", logging.WARNING, __file__, 0,
                                       "%d mail log line(s) dropped: the log destination did not keep up",
                                       (dropped - self._told,), None)
            self._told = dropped
            self.handle(record)

    def stop(self, timeout: float = FLUSH_TIMEOUT) -> bool:  # type: ignore[override]
        """Write what is queued and end the thread; False when the destination
        did not move within *timeout* (the thread is then left behind, blocked)."""
        thread = self._thread
        if thread is None:
            return True
        deadline = time.monotonic() + timeout
        self.queue.put(self._sentinel)  # never blocks (a SimpleQueue): the join below has the deadline
        self.bell.put_nowait(None)
        thread.join(max(0.0, deadline - time.monotonic()))
        self._thread = None
        return not thread.is_alive()
