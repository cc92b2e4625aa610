"""The root side of delivery for a serve that runs as ``mail_owner``: local(8)'s
``/file`` and ``|command`` targets and virtual(8) mailboxes owned by other uids
(the parts of Postfix's local(8) and virtual(8) that need root).

serve started as root cannot become ``default_privs``, an include file's owner
or a virtual mailbox's owner once it is ``mail_owner``, and must never run those
deliveries as itself.  So, just before the privilege drop, ``start()`` launches
this module as a small root child (``python -m trimail.delivery.local.privileged``) that
lives as long as serve, when ``needed()``: file or command targets allowed
(``allow_mail_to_files``, ``allow_mail_to_commands``) or virtual mailboxes
configured (``virtual_mailbox_domains`` with ``virtual_transport = virtual``).
It gets serve's configuration once through a pipe that is closed before the
drop, then reads requests on its standard input and answers on its standard
output.  Requests run in parallel, each on a thread of its own (up to
``CONCURRENCY`` from serve, one at a time per recipient), and each answer
carries its request's ``id``: a local user's slow ``|command`` (bounded only by
``command_time_limit``) or a locked mbox holds up that recipient's deliveries,
not every other user's file, command and virtual mailbox deliveries, as it did
when the helper took one request at a time.

Security notes: the requests come from a ``mail_owner`` process, which an
attacker may control, so the helper trusts nothing in them but the recipient,
the envelope and the message.  For a file or command it expands the
recipient's aliases itself, with its own tables and include files (the same
rules: trimail.delivery.local.aliases), and runs a target only when that expansion
yields the same kind and value; the identity (trimail.delivery.local.identity: never
root, never mail_owner, the user's primary group only) and
``allow_mail_to_files`` are decided here too.  For a virtual mailbox it looks
the recipient up in its own virtual_mailbox_maps, virtual_uid_maps and
virtual_gid_maps, checks the path and refuses uid/gid 0 and uids below
virtual_minimum_uid (trimail.delivery.virtual), and writes through a child that
becomes the owner first (trimail.delivery.local.filewriter).  So a compromised
``mail_owner`` can make it do what mail to that recipient would do anyway,
nothing else (the bound of Postfix's local(8) and virtual(8), which trust only
their configuration).  A request is bounded: a header line of 64 KiB and a
message of ``message_size_limit`` plus 1 MiB (the headers queued copies and
delivery add); serve bounces a larger one (5.3.4) without sending it, and a
request that breaks these bounds (or is not JSON with an integer ``size``) ends
the helper, after the requests already running.  Every answer is one JSON line.  The helper uses the configuration serve started with: a reload changes
the tables it reads (they are re-read when their files change), not its
parameters.

serve's side (``Helper``) never waits without a deadline: a delivery waits at
most ``round_trip_limit()`` (the longest a request may take in the helper,
``command_time_limit`` or the mbox lock wait, plus 30 s) for one of the
``CONCURRENCY`` slots and its turn to write, then as long again for its answer;
past either it is deferred (4.3.0).  One reader thread gives each answer to the
request its ``id`` names and drops late ones.  A helper that exits (or is killed),
or stops reading a request half-way, cannot be started again: it must be
started as root, which serve no longer is.  serve logs that once, defers every
delivery that needs it (4.3.0, "restart serve") and ``trimail status`` prints a
warning until serve is restarted; everything else keeps working.

Parameters: the local and virtual delivery parameters (trimail.delivery.local,
trimail.delivery.virtual), message_size_limit, command_time_limit,
deliver_lock_attempts, deliver_lock_delay, allow_mail_to_commands, allow_mail_to_files,
virtual_mailbox_domains, virtual_transport; read at start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, NoReturn

from trimail.config import Config

MAX_HEADER = 64 * 1024
PACKAGE_ROOT = str(Path(__file__).resolve().parents[3])  # where this trimail is imported from
CONCURRENCY = 8  # requests serve has in the helper at once (each a thread there)
MAX_MESSAGE = 1 << 30  # message_size_limit = 0 (no limit)
MARGIN = 1 << 20  # the headers queued copies and local delivery add to a message within message_size_limit
log = logging.getLogger("trimail.master")


class HelperGone(Exception):
    """The helper is not running, busy past its deadline or broke the protocol:
    the delivery is deferred (4.3.0)."""


def message_limit(config: Config) -> int:
    """The largest message the helper accepts: message_size_limit plus MARGIN."""
    limit = int(config.message_size_limit)
    return limit + MARGIN if limit > 0 else MAX_MESSAGE


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
        proc = subprocess.Popen([sys.executable, "-m", "trimail.delivery.local.privileged", str(read_end)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=(read_end,), cwd="/",
                                env={"PATH": "/usr/bin:/bin", "PYTHONPATH": PACKAGE_ROOT})
    finally:
        os.close(read_end)
    with open(write_end, "wb") as pipe:
        pipe.write(pickle.dumps(config))
    _helper = Helper(proc, message_limit(config), round_trip_limit(config))
    log.info("root delivery helper started (pid %d)", proc.pid)
    return _helper


def _answer(out: IO[bytes], ident: object, status: str, dsn: str = "", text: str = "") -> None:
    out.write(json.dumps({"id": ident, "status": status, "dsn": dsn, "text": text}).encode() + b"\n")
    out.flush()


class _Turns:
    """One request per recipient at a time (Postfix delivers to one recipient
    with a bounded concurrency; here a recipient's slow command or locked mbox
    holds only that recipient's later requests)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, list[Any]] = {}  # key -> [lock, users]

    @contextlib.contextmanager
    def turn(self, key: str) -> Iterator[None]:
        with self._lock:
            entry = self._held.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._lock:
                entry[1] -= 1
                if not entry[1]:
                    del self._held[key]


def serve_requests(config: Config, inp: IO[bytes], out: IO[bytes]) -> None:
    """The helper's loop: read requests one after the other and run each on a
    thread of its own (at most 2 x CONCURRENCY at once; one at a time per
    recipient), answering with its ``id`` as it finishes, until serve closes
    the pipe; then wait for the requests still running."""
    from trimail.delivery.local.agent import LocalAgent
    from trimail.delivery.virtual import VirtualAgent

    agent, virtual, limit = LocalAgent(config), VirtualAgent(config), message_limit(config)
    slots, turns, out_lock = threading.BoundedSemaphore(2 * CONCURRENCY), _Turns(), threading.Lock()
    workers: list[threading.Thread] = []

    def one(request: dict[str, Any], content: bytes) -> None:
        try:
            handler = virtual if request.get("kind") == "virtual" else agent
            with turns.turn(f"{request.get('kind')}:{str(request.get('recipient')).lower()}"):
                result = handler.privileged(request, content)
        except Exception as exc:  # noqa: BLE001 - the boundary of one request: answer, go on
            result = ("deferred", "4.3.0", f"delivery helper: internal error: {type(exc).__name__}")
        slots.release()  # before the answer: serve may send the next request as soon as it has it
        try:
            with out_lock:
                _answer(out, request.get("id"), *result)
        except (OSError, ValueError):
            pass  # serve closed its end

    try:
        while True:
            line = inp.readline(MAX_HEADER + 1)
            if not line:
                return
            try:
                request = json.loads(line)
                size = request["size"]
                if type(size) is not int or not 0 <= size <= limit or len(line) > MAX_HEADER:
                    raise ValueError("bad size")  # serve sends an integer; 1e999, NaN, "12" or true are forged
            except (ValueError, KeyError, TypeError):
                return  # a peer that breaks the protocol gets no more answers
            content = inp.read(size)
            if len(content) != size:
                return
            slots.acquire()  # serve sends at most CONCURRENCY at once (more only after giving up on some)
            worker = threading.Thread(target=one, args=(request, content), name="delivery request")
            worker.start()
            workers = [w for w in workers if w.is_alive()] + [worker]
    finally:
        for worker in workers:
            worker.join()


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C at serve's terminal: serve ends, then we do (EOF)
    with open(int(argv[0]), "rb") as pipe:
        config = pickle.loads(pipe.read())  # written by serve as root, closed before the drop
    serve_requests(config, sys.stdin.buffer, sys.stdout.buffer)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
