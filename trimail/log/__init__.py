"""The mail log: its writer thread, and the calls serve makes on it (``setup``,
``shutdown``, ``mark``, ``entering_jail``, ``dropped_lines``, ``printable``).

Lines are in Postfix's format (``format.py``), so pflogsumm and operators' habits
work.  They are written to stderr by default, to ``maillog_file`` when set, or to
syslog when it is ``syslog`` (with ``syslog_facility``): ``destinations.py``.

Nothing on the event loop waits for the log destination.  ``setup`` puts a
``QueueHandler`` on the ``trimail`` logger: the thread that logs only merges the
message with its arguments and puts the record on a bounded queue; one writer
thread (a ``QueueListener``) formats the lines and writes them, and only that
thread can block on a slow disk, a full pipe or a stopped journald.  It writes
the lines waiting together and rests ``BATCH_WAIT`` (10 ms) after each write:
under load it takes the interpreter from the event loop once per batch, not once
per line (two lines per SMTP connection were a large share of its cost).  An
smtpd worker about to commit a message puts a mark in the queue (``mark``), which
ends the rest; the qmgr worker (another process) is woken about the message once
both the commit is done and the lines before the mark are written, by whichever
thread comes second, so the log reads in the order things happened and nobody
waits for the log.  Past
``MAX_QUEUED_LINES`` waiting lines, new lines are dropped and counted (the
``trimail_log_lines_dropped_total`` metric, and one warning line once the writer
catches up), so a stuck destination costs log lines, never the daemon's memory or
its sessions.  ``shutdown()`` (called when serve ends, and at exit) writes what
is queued, waiting at most ``FLUSH_TIMEOUT`` seconds for a destination that
does not move.

``maillog_file`` is opened at start (before serve drops root or enters its jail)
and reopened when logrotate moves it (no signal needed).  Inside a ``chroot =
yes`` jail the path is followed when the file lies inside ``queue_directory``
(``entering_jail``); a file outside the jail stays open and is written, but it
cannot be reopened (serve logs this once at start): rotate it with logrotate's
``copytruncate``, or use syslog or stderr.  Likewise, after serve became
``mail_owner``, a rotated file it may not open is not reopened (one warning; the
old file goes on receiving the lines): let logrotate ``create`` it for
``mail_owner``.  Errors of the destination itself are written to stderr once per
kind, never as a traceback.

Security notes: ``printable`` is how client-supplied text is made safe for a line
or a header (printable, bounded); a stuck destination never blocks a session or
grows memory (the bound above).

Parameters: maillog_file, syslog_facility (read by the caller and passed to
``setup``).
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from trimail.log.destinations import MailLogFile, StreamLog, SyslogLog
from trimail.log.format import PostfixFormatter, SyslogFormatter

MAX_QUEUED_LINES = 10_000
BATCH_LINES = 512  # lines written together at most (one write() for the lines waiting)
BATCH_WAIT = 0.01  # seconds the writer rests after a write (so a line may wait this long to be written)
FLUSH_TIMEOUT = 5.0
STUCK_AFTER = 0.05  # seconds a mark may wait for its lines before mark() stops putting more

_listener: _Writer | None = None


class _BoundedQueueHandler(logging.handlers.QueueHandler):
    """Never blocks the logging thread: past the bound, a line is dropped and counted."""

    def __init__(self, bound: int) -> None:
        # a SimpleQueue: put() is one C call without a Condition to notify (a
        # queue.Queue's put cost the event loop 6% of its time under a retry storm)
        super().__init__(queue.SimpleQueue())
        self.bound = bound
        self.dropped = 0

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
            self.queue.put_nowait(record)


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


def mark() -> Written | None:
    """A mark after the lines logged so far, the writer woken from its rest to write
    them now (while the caller's commit is being fsynced, typically).  None when no
    writer runs (the lines were written at once) or when the destination has not
    moved for ``STUCK_AFTER`` seconds (a mark put before is still waiting) or its
    queue is full: the caller then goes on without it, out of order rather than
    never.  A mark already put may wait for good behind a stuck destination: its
    caller must not wait for it alone (``scheduler.trigger.QmgrTrigger.wake_after``).

    An smtpd worker marks before each commit and has its wake-up of the qmgr worker
    sent through the mark (``receive.commit``): the qmgr, another process, logs about
    the message a moment later, and its lines must not reach the log before this
    process's ``client=`` and ``message-id=`` lines (pflogsumm and people read the
    log in order).  Nobody waits: the session sends its ``250`` after the commit, and
    the writer thread sends the wake-up when it is the later of the two."""
    listener = _listener
    if listener is None:
        return None
    since = listener.marked_since
    now = time.monotonic()
    if since and now - since > STUCK_AFTER or listener.queue.qsize() >= listener.source.bound:
        return None
    if not since:
        listener.marked_since = now
    written = Written()
    listener.queue.put_nowait(written)
    listener.hurry.set()
    return written


class _Writer(logging.handlers.QueueListener):
    """The thread that formats and writes; says how many lines were dropped once
    it has caught up, and stops within a deadline."""

    def __init__(self, source: _BoundedQueueHandler, target: logging.Handler) -> None:
        super().__init__(source.queue, target)
        self.source = source
        self.target = target
        self._told = 0
        self.marked_since = 0.0  # monotonic time the oldest mark not yet reached was put (0: none)
        self.hurry = threading.Event()  # ends the rest after a write: see mark()

    def _monitor(self) -> None:
        """Write the lines waiting (up to ``BATCH_LINES``) together, then rest unless the
        batch was full (a put() meanwhile wakes nobody); stop at the sentinel."""
        q = self.queue
        while True:
            records = [q.get()]
            while len(records) < BATCH_LINES:
                try:
                    records.append(q.get_nowait())
                except queue.Empty:
                    break
            stop = self._sentinel in records  # None: no record compares equal to it
            if stop:
                del records[records.index(self._sentinel):]
            marks = [r for r in records if type(r) is Written]
            if marks:
                records = [r for r in records if type(r) is not Written]
            if records:
                self.write(records)
            if marks:
                self.marked_since = 0.0  # (a mark put meanwhile is dated by the next one)
                for mark in marks:
                    if mark.arrive():
                        mark.done()  # type: ignore[misc]
            if stop:
                return
            if len(records) < BATCH_LINES:  # a full batch: more are waiting, no rest
                self.hurry.wait(BATCH_WAIT)
                self.hurry.clear()

    def write(self, records: list[logging.LogRecord]) -> None:
        target = self.target
        emit_many = getattr(target, "emit_many", None)
        if emit_many is None or target.filters:  # syslog: one datagram per line
            for record in records:
                self.handle(record)
        else:
            target.acquire()
            try:
                emit_many(records)
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
        thread.join(max(0.0, deadline - time.monotonic()))
        self._thread = None
        return not thread.is_alive()


def setup(hostname: str, stream: TextIO | None = None, level: int = logging.INFO, maillog_file: str = "",
          syslog_facility: str = "mail", bound: int = MAX_QUEUED_LINES) -> None:
    """Send the mail log to *maillog_file* (reopened when logrotate moves it), to
    syslog when it is ``syslog``, else to stderr, through the writer thread, with
    at most *bound* lines waiting.  Raises OSError when *maillog_file* cannot be
    opened."""
    global _listener
    # The logging HOWTO's "Optimization" settings: we never print caller, thread or
    # process fields, and collecting them costs a measurable share of each message.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    shutdown()
    root = logging.getLogger("trimail")
    for old in list(root.handlers):
        root.removeHandler(old)
    target: logging.Handler
    if maillog_file == "syslog":
        facility = logging.handlers.SysLogHandler.facility_names.get(syslog_facility, "mail")
        target = SyslogLog(facility)
        target.setFormatter(SyslogFormatter())
    elif maillog_file:
        target = MailLogFile(maillog_file)
        target.setFormatter(PostfixFormatter(hostname))
    else:
        target = StreamLog(stream or sys.stderr)
        target.setFormatter(PostfixFormatter(hostname))
    source = _BoundedQueueHandler(bound)
    _listener = _Writer(source, target)
    _listener.start()
    root.addHandler(source)
    root.setLevel(level)
    root.propagate = False


def shutdown(timeout: float = FLUSH_TIMEOUT) -> None:
    """Write every queued line and stop the writer thread (at most *timeout* s);
    later lines go straight to the destination, in the caller's thread."""
    global _listener
    listener, _listener = _listener, None
    if listener is None:
        return
    root = logging.getLogger("trimail")
    target = listener.target
    if listener.source in root.handlers:
        root.removeHandler(listener.source)
    if not listener.stop(timeout):
        # The writer is stuck inside a write, holding the handler's lock: give the
        # handler a new lock and no stream, so logging's own shutdown at exit
        # neither waits for it nor flushes into it.  The queued lines are lost.
        target.lock = threading.RLock()
        if isinstance(target, logging.StreamHandler):
            target.stream = None  # type: ignore[assignment]
        return
    root.addHandler(target)  # late lines (exit) go straight to the destination
    try:
        target.flush()
    except (OSError, ValueError):
        pass


atexit.register(shutdown)


def dropped_lines() -> int:
    """Lines dropped so far because the destination did not keep up."""
    return _listener.source.dropped if _listener is not None else 0


@contextmanager
def entering_jail(root: Path) -> Iterator[None]:
    """Around ``chroot(root)``: no line is written meanwhile, and afterwards the
    mail log file is followed by its path inside the jail (or only written, when
    it lies outside: one warning)."""
    target = _listener.target if _listener is not None else None
    if not isinstance(target, MailLogFile):
        yield
        return
    warning = None
    # a writer stuck in a write holds the lock: then go on without it (the flip is atomic)
    locked = target.lock is not None and target.lock.acquire(timeout=FLUSH_TIMEOUT)
    try:
        yield
        warning = target.enter_jail(root)
    finally:
        if locked:
            target.lock.release()  # type: ignore[union-attr]
    if warning:
        logging.getLogger("trimail.master").warning("%s", warning)


def printable(text: str, limit: int = 256) -> str:
    """Client-supplied text made safe for a log line or a header: printable, bounded."""
    if len(text) <= limit and text.isprintable():  # the usual case (a HELO name), without a loop
        return text
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in text[:limit])
    return cleaned + ("..." if len(text) > limit else "")
