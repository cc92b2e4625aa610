"""The root delivery helper itself: the process ``privileged.start()`` launches
(``python -m trimail.delivery.local.roothelper``) just before serve drops root,
for local(8)'s ``/file`` and ``|command`` targets and virtual(8) mailboxes owned
by other uids (the parts of Postfix's local(8) and virtual(8) that need root).

It gets serve's configuration once through a pipe that serve closes before the
drop, then reads requests on its standard input and answers on its standard
output, one JSON line per answer carrying its request's ``id``.  Requests run in
parallel, each on a thread of its own (up to ``CONCURRENCY`` from serve, one at a
time per recipient): a local user's slow ``|command`` (bounded only by
``command_time_limit``) or a locked mbox holds up that recipient's deliveries,
not every other user's.  It uses the configuration serve started with: a reload
changes the tables it reads (they are re-read when their files change), not its
parameters.

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
their configuration).  A request is bounded: a header line of ``MAX_HEADER``
(64 KiB) and a message of ``message_size_limit`` plus ``MARGIN`` (1 MiB, the
headers queued copies and delivery add; ``message_limit``); a request that
breaks these bounds (or is not JSON with an integer ``size``) ends the helper,
after the requests already running.

Parameters: the local and virtual delivery parameters (trimail.delivery.local,
trimail.delivery.virtual), message_size_limit, allow_mail_to_files; read at start.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import signal
import sys
import threading
from collections.abc import Iterator
from typing import IO, Any

from trimail.config import Config

MAX_HEADER = 64 * 1024
CONCURRENCY = 8  # requests serve has in the helper at once (each a thread there)
MAX_MESSAGE = 1 << 30  # message_size_limit = 0 (no limit)
MARGIN = 1 << 20  # the headers queued copies and local delivery add to a message within message_size_limit


def message_limit(config: Config) -> int:
    """The largest message the helper accepts: message_size_limit plus MARGIN."""
    limit = int(config.message_size_limit)
    return limit + MARGIN if limit > 0 else MAX_MESSAGE


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
