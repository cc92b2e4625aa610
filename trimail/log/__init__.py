"""The mail log: its writer thread, and the calls serve makes on it (``setup``,
``shutdown``, ``mark``, ``entering_jail``, ``dropped_lines``, ``printable``).

The writer thread, its queue and its marks are in ``writer.py``.  Lines are in
Postfix's format (``format.py``), so pflogsumm and operators' habits
work.  They are written to stderr by default, to ``maillog_file`` when set, or to
syslog when it is ``syslog`` (with ``syslog_facility``): ``destinations.py``.

Nothing on the event loop waits for a log destination that can stop (a pipe,
syslog; see ``mark`` for a file).  ``setup`` puts a
``QueueHandler`` on the ``trimail`` logger: the thread that logs only merges the
message with its arguments and puts the record on a bounded queue; one writer
thread (a ``QueueListener``) formats the lines and writes them, and only that
thread can block on a full pipe or a stopped journald (an smtpd worker's loop
writes into a log file too, as it writes the queue: below).  It writes
the lines waiting together and rests ``BATCH_WAIT`` (10 ms) after each write:
under load it takes the interpreter from the event loop once per batch, not once
per line (two lines per SMTP connection were a large share of its cost).  An
smtpd worker about to commit a message has the lines about it written first
(``mark``), so the qmgr worker (another process) never logs about the message
before them.  The queue manager, before it records a job's outcomes, writes its
``status=`` lines into a log file (``scheduler.results``): a ``kill -9`` never
leaves a recorded delivery without its line there (into syslog or a pipe they
follow within ``BATCH_WAIT``).  Into a destination that never waits for a reader
(a file or /dev/null) the caller writes the lines waiting itself, into the open
file (``write_waiting``: a moved ``maillog_file`` is reopened by the writer
thread only; whoever takes
lines from the queue holds ``Writer.lock`` until they are written, so they keep
their order); into a pipe, a socket or syslog it puts a mark in the queue, which
ends the writer's rest, and the qmgr is woken once both the commit is done and the
lines before the mark are written, by whichever thread comes second.  Past
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
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from trimail.log.destinations import MailLogFile, StreamLog, SyslogLog
from trimail.log.format import PostfixFormatter, SyslogFormatter
from trimail.log.writer import FLUSH_TIMEOUT, MAX_QUEUED_LINES, BoundedQueueHandler, Writer, Written

STUCK_AFTER = 0.05  # seconds a mark may wait for its lines before mark() stops putting more
WRITER_TURN = 0.005  # seconds a committer waits for the writer thread's write into a file (write_waiting)

_listener: Writer | None = None


def mark() -> Written | None:
    """A mark after the lines logged so far, the writer woken from its rest to write
    them now (while the caller's commit is being fsynced, typically).  None when the
    lines are written already: no writer runs, or the caller wrote them itself (into a
    file: ``write_waiting``); or when the destination has not moved for
    ``STUCK_AFTER`` seconds (a mark put before is still waiting) or its queue is full:
    the caller then goes on without it, out of order rather than never.  A mark
    already put may wait for good behind a stuck destination: its caller must not wait
    for it alone (``scheduler.trigger.QmgrTrigger.wake_after``).

    An smtpd worker marks before each commit and has its wake-up of the qmgr worker
    sent through the mark (``receive.commit``): the qmgr, another process, logs about
    the message a moment later, and its lines must not reach the log before this
    process's ``client=`` and ``message-id=`` lines (pflogsumm and people read the
    log in order).  Nobody waits: the session sends its ``250`` after the commit, and
    the writer thread sends the wake-up when it is the later of the two."""
    listener = _listener
    if listener is None or write_waiting():
        return None
    since = listener.marked_since
    now = time.monotonic()
    if since and now - since > STUCK_AFTER or listener.queue.qsize() >= listener.source.bound:
        return None
    if not since:
        listener.marked_since = now
    written = Written()
    listener.put(written)
    listener.hurry.set()
    return written


def write_waiting() -> bool:
    """Write the lines waiting now, in the caller's thread, when the destination never
    waits for a reader (a regular file, /dev/null: ``destinations._Batched.never_waits``) and
    the writer thread's write (into the same file) ends within ``WRITER_TURN``; whether
    it did.  ``mark`` does, before a commit:
    one write() there costs an smtpd worker less than waking the writer thread for
    every message (about five hand-overs of the interpreter between the threads per
    message, measured), and the lines are out before the commit is, so no qmgr round
    (woken by any process) can log about the message first."""
    listener = _listener
    # the writer thread may hold the lock, writing other lines into the same file: never long
    if listener is None or not listener.direct or not listener.lock.acquire(timeout=WRITER_TURN):
        return False
    try:
        if not listener.target.never_waits():  # type: ignore[attr-defined]  # reopened meanwhile
            return False
        while listener.take_and_write(in_thread=False)[1]:  # into the open stream, never reopened here;
            pass  # a full batch: more lines wait before this caller's
    finally:
        listener.lock.release()
    return True


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
    source = BoundedQueueHandler(bound)
    _listener = Writer(source, target)
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
