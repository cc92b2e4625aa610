"""serve's side of the root delivery helper, for a serve that runs as
``mail_owner``: starting it, and the channel its deliveries go through
(``Helper``).  The helper itself, and what it trusts, is
``trimail.delivery.local.roothelper``.

serve started as root cannot become ``default_privs``, an include file's owner
or a virtual mailbox's owner once it is ``mail_owner``, and must never run those
deliveries as itself.  So, just before the privilege drop, ``start()`` launches
the helper as a small root child that lives as long as serve, when
``needed()``: file or command targets allowed (``allow_mail_to_files``,
``allow_mail_to_commands``) or virtual mailboxes configured
(``virtual_mailbox_domains`` with ``virtual_transport = virtual``).  It hands the
helper serve's configuration once through a pipe that is closed before the drop.
Up to ``CONCURRENCY`` requests are in the helper at once, each with an ``id`` its
answer carries.

serve's side never waits without a deadline: a delivery waits at most
``round_trip_limit()`` (the longest a request may take in the helper,
``command_time_limit`` or the mbox lock wait, plus 30 s) for one of the
``CONCURRENCY`` slots and its turn to write, then as long again for its answer;
past either it is deferred (4.3.0).  One reader thread gives each answer to the
request its ``id`` names and drops late ones.  A message larger than the helper
accepts (``roothelper.message_limit``) is bounced (5.3.4) without being sent.  A
helper that exits (or is killed), or stops reading a request half-way, cannot be
started again: it must be started as root, which serve no longer is.  serve logs
that once, defers every delivery that needs it (4.3.0, "restart serve") and
``trimail status`` prints a warning (``state()``) until serve is restarted;
everything else keeps working.

Security notes: the helper's answers are read with a bound (``MAX_HEADER`` a
line) and must be JSON objects; one that breaks the protocol ends the channel.
The helper is started with a minimal environment, ``/`` as its directory and
only this trimail on its path.

Parameters: message_size_limit, command_time_limit, deliver_lock_attempts,
deliver_lock_delay, allow_mail_to_commands, allow_mail_to_files,
virtual_mailbox_domains, virtual_transport; read at start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

from trimail.config import Config
from trimail.delivery.local.roothelper import CONCURRENCY, MAX_HEADER, MAX_MESSAGE, message_limit

PACKAGE_ROOT = str(Path(__file__).resolve().parents[3])  # where this trimail is imported from
log = logging.getLogger("trimail.master")


class HelperGone(Exception):
    """The helper is not running, busy past its deadline or broke the protocol:
    the delivery is deferred (4.3.0)."""


def round_trip_limit(config: Config) -> float:
    """How long serve waits for the helper (for its turn, then for the answer):
    the longest a request may take there (command_time_limit for commands and
    virtual mailboxes, the mbox lock wait of a /file target) plus a margin."""
    lock_wait = max(60.0, config.deliver_lock_attempts * config.deliver_lock_delay * 1.5 + 30)
    return max(float(config.command_time_limit), lock_wait) + 30.0


def needed(config: Config) -> bool:
    """Whether a serve about to drop root needs the helper: file or command
    targets of local delivery, or virtual(8) mailboxes (owned by other uids)."""
    virtual = bool(config.virtual_mailbox_domains) and config.virtual_transport == "virtual"
    return bool(config.allow_mail_to_commands or config.allow_mail_to_files or virtual)


class Helper:
    """serve's handle on the root child: ``run(request, content)`` -> answer.

    Up to CONCURRENCY requests are in the helper at once, each with an ``id``
    its answer carries (the helper runs them in parallel: one slow command does
    not hold up other users' deliveries).  Every wait has a deadline
    (``timeout``): a caller that cannot get a slot or its turn to write, or gets
    no answer in time, is told HelperGone (deferred); its late answer is
    dropped.  A helper that exited, or stopped reading a request half-way, is
    gone for good: it was started as root and serve no longer is, so it cannot
    be started again; that is logged once, and every delivery that needs it is
    deferred until serve is restarted."""

    def __init__(self, proc: subprocess.Popen[bytes], limit: int = MAX_MESSAGE, timeout: float = 1030.0,
                 concurrency: int = CONCURRENCY) -> None:
        self.proc = proc
        self.limit = limit
        self.timeout = timeout
        self._slots = threading.BoundedSemaphore(concurrency)  # requests in the helper at once
        self._write_lock = threading.Lock()  # one request on the pipe at a time
        self._state = threading.Condition()  # guards everything below
        self._next_id = 0
        self._sent: dict[int, dict[str, Any] | None] = {}  # id -> answer, in the order sent
        self._abandoned: set[int] = set()  # ids whose caller stopped waiting
        self.broken: str | None = None
        self._ended: str | None = None  # why the reader stopped (logged by the next caller, in _gone)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                os.set_blocking(stream.fileno(), False)
        threading.Thread(target=self._read_answers, name="root delivery helper answers", daemon=True).start()

    def run(self, request: dict[str, Any], content: bytes) -> dict[str, Any]:
        if len(content) > self.limit:
            return {"status": "bounced", "dsn": "5.3.4",
                    "text": f"message too large for delivery as another user ({len(content)} bytes)"}
        deadline = time.monotonic() + self.timeout  # the helper bounds each request itself: this is a backstop
        if not self._slots.acquire(timeout=self.timeout):
            raise HelperGone(f"the root delivery helper is busy (no turn within {self.timeout:g}s)")
        try:
            return self._round_trip(request, content, deadline)
        finally:
            self._slots.release()

    def _round_trip(self, request: dict[str, Any], content: bytes, deadline: float) -> dict[str, Any]:
        if not self._write_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise HelperGone(f"the root delivery helper is busy (no turn within {self.timeout:g}s)")
        try:
            self._alive()
            with self._state:
                ident = self._next_id = self._next_id + 1
                self._sent[ident] = None
            header = json.dumps({**request, "id": ident, "size": len(content)}).encode() + b"\n"
            try:
                self._write(header + content, deadline)
            except OSError as exc:
                self._gone(f"its pipe failed: {exc.strerror or exc}")
        finally:
            self._write_lock.release()
        deadline = time.monotonic() + self.timeout  # the answer's own deadline, after the turn's
        with self._state:
            while self._sent.get(ident) is None and self.broken is None and self._ended is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._abandoned.add(ident)
                    raise HelperGone(f"the root delivery helper did not answer within {self.timeout:g}s")
                self._state.wait(left)
            answer = self._sent.pop(ident, None)
        if answer is None:
            self._gone(self._ended or "it stopped answering")
        return answer

    def _read_answers(self) -> None:
        """The reader: one JSON line per answer, given to the request its ``id``
        names (an answer without one to the oldest request still owed one)."""
        assert self.proc.stdout is not None
        fd, buffer = self.proc.stdout.fileno(), b""
        try:
            while True:
                while b"\n" not in buffer:
                    if len(buffer) > MAX_HEADER:
                        return self._end("its answer is too long")
                    poller = select.poll()  # not select(): serve may hold more than FD_SETSIZE descriptors
                    poller.register(fd, select.POLLIN)
                    poller.poll()
                    try:
                        chunk = os.read(fd, 65536)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        return self._end("it closed its answers")
                    buffer += chunk
                line, _, buffer = buffer.partition(b"\n")
                try:
                    answer = json.loads(line)
                except ValueError:
                    answer = None
                if not isinstance(answer, dict):
                    return self._end("it broke the protocol")
                self._deliver(answer)
        except (OSError, ValueError) as exc:  # the pipe was closed under us
            self._end(f"its pipe failed: {exc}")

    def _end(self, why: str) -> None:
        with self._state:
            self._ended = why
            self._state.notify_all()

    def _deliver(self, answer: dict[str, Any]) -> None:
        with self._state:
            ident = answer.get("id")
            if not isinstance(ident, int) or ident not in self._sent:
                ident = next((i for i, got in self._sent.items() if got is None), None)
            if ident is None or self._sent.get(ident) is not None:
                return  # an answer nobody is owed: dropped
            if ident in self._abandoned:  # its caller gave up: a late answer is dropped
                self._abandoned.discard(ident)
                del self._sent[ident]
                return
            self._sent[ident] = answer
            self._state.notify_all()

    def _alive(self) -> None:
        if self.broken is None and self.proc.poll() is not None:
            self._mark_gone(f"it exited with status {self.proc.returncode}")
        if self.broken is None and self._ended is not None:
            self._mark_gone(self._ended)
        if self.broken is not None:
            raise HelperGone(self.broken)

    def _mark_gone(self, why: str) -> None:
        with self._state:
            if self.broken is not None:
                return
            self.broken = "the root delivery helper is gone (restart serve)"
            self._state.notify_all()
        log.error("the root delivery helper is gone: %s; file, command and virtual mailbox deliveries as other "
                  "users are deferred until serve is restarted (it cannot start the helper without root)", why)
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()

    def _gone(self, why: str) -> NoReturn:
        self._mark_gone(why)
        raise HelperGone(self.broken)

    def _write(self, data: bytes, deadline: float) -> None:
        assert self.proc.stdin is not None
        fd, view = self.proc.stdin.fileno(), memoryview(data)
        while view:
            if not _ready(fd, select.POLLOUT, deadline):
                self._gone("it stopped reading a request")  # the stream is out of step for good
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                continue



def _ready(fd: int, event: int, deadline: float) -> bool:
    """Whether *fd* is ready (or failed: the next call says how) before *deadline*."""
    poller = select.poll()  # not select(): serve may hold more than FD_SETSIZE descriptors
    poller.register(fd, event)
    return bool(poller.poll(max(0, int((deadline - time.monotonic()) * 1000))))


_helper: Helper | None = None


def helper() -> Helper | None:
    return _helper


def state() -> str:
    """For ``trimail status``: "" without a helper, "running", or why it is gone."""
    if _helper is None:
        return ""
    if _helper.broken is None and _helper.proc.poll() is None:
        return "running"
    return _helper.broken or f"the root delivery helper is gone: exited with status {_helper.proc.returncode} " \
                             "(restart serve)"


def start(config: Config) -> Helper:
    """Launch the helper (serve is still root) and hand it *config* through a pipe
    that is closed again before serve drops its privileges."""
    global _helper
    read_end, write_end = os.pipe()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "trimail.delivery.local.roothelper", str(read_end)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=(read_end,), cwd="/",
                                env={"PATH": "/usr/bin:/bin", "PYTHONPATH": PACKAGE_ROOT})
    finally:
        os.close(read_end)
    with open(write_end, "wb") as pipe:
        pipe.write(pickle.dumps(config))
    _helper = Helper(proc, message_limit(config), round_trip_limit(config))
    log.info("root delivery helper started (pid %d)", proc.pid)
    return _helper
