"""The control socket: ``$queue_directory/control``, a UNIX stream socket (0600).

One line per connection, one line back.  Commands: ``flush`` (wake the scheduler
and forget the destinations it holds dead: the database already says what is
due), ``wake`` (only wake it: hold, release, delete, requeue) and ``ping``.  The operator's tools use it
to make serve act now; the database stays the source of truth, so a tool works
the same when serve is not running.  ``reload``, ``stop``, ``status`` and ``dead``
(the destinations the queue manager holds dead, as JSON: trimail.qshape) come
from service.Server.

Security: the socket is 0600 (only root and mail_owner reach it).  A command line
is at most 256 bytes and must arrive within 5 s; clients are served concurrently
(at most 32 at once) and each request has its own error boundary, so a client that
resets, stays silent or sends garbage costs its own request only.  Commands run
one at a time, except the read-only ``ping``, ``status`` and ``dead``, which are
answered even while a slow reload or a stop runs.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import trio

from trimail.log import printable
from trimail.net.controlclient import CONTROL_NAME, MAX_ANSWER, send_command, socket_address  # noqa: F401 (theirs)
from trimail.net.listener import ListenError, close_now
from trimail.net.reading import receive_until, request_read, serve_requests
from trimail.supervise import FailureCounter

MAX_LINE = 256
READ_TIMEOUT = 5.0  # seconds to send a command line, and to take the answer
READ_ONLY = frozenset({"ping", "status", "dead"})  # answered even while a reload or stop runs
KEEP_EVERY = 5.0  # seconds between looks at the socket file (serve_control binds it again when it is gone)

log = logging.getLogger("trimail.master")


async def open_control_listener(queue_directory: Path) -> trio.SocketListener:
    path = queue_directory / CONTROL_NAME
    if os.path.lexists(path):  # a socket left behind, or anything else by that name (a link too)
        path.unlink()
    # bound here, not through trio's bind (a worker thread for every UNIX socket):
    # creating one socket file in our own directory does not block
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        with socket_address(path) as address:
            sock.bind(address)
        sock.listen(16)
    except OSError as exc:  # e.g. a directory we may not write
        sock.close()
        raise ListenError(f"control socket {path}: {exc.strerror or exc}") from None
    finally:
        os.umask(old)
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))  # (no turn of the loop: nothing waited)


@contextlib.asynccontextmanager
async def _no_lock() -> AsyncIterator[None]:
    yield


async def serve_control(listener: trio.SocketListener,
                        commands: dict[str, Callable[[], str | Awaitable[str]]],
                        metrics: FailureCounter | None = None, queue_directory: Path | None = None) -> None:
    """Answer one command per connection.  Clients are read concurrently (a silent
    one cannot hold the socket), each request in its own error boundary; commands
    run one at a time, so two reloads never interleave.  With *queue_directory*,
    the socket file is bound again when it was removed or replaced (``_keep_path``)."""
    one_at_a_time = trio.Lock()

    async def handle(stream: trio.SocketStream) -> None:
        with trio.move_on_after(READ_TIMEOUT) as reading:
            line = await receive_until(stream, b"\n", MAX_LINE)
        request_read()
        if reading.cancelled_caught or not line or (b"\n" not in line and len(line) >= MAX_LINE):
            return  # silent, too slow or over-long: nothing was asked
        command = line.split(b"\n")[0].decode("ascii", "replace").strip()
        handler = commands.get(command)
        async with one_at_a_time if command not in READ_ONLY else _no_lock():
            answer = handler() if handler else f"error: unknown command {printable(command, 64)!r}"
            if inspect.isawaitable(answer):
                answer = await answer
        with trio.move_on_after(READ_TIMEOUT):
            await stream.send_all(answer.encode() + b"\n")

    async def serve(listener: trio.SocketListener) -> None:
        await serve_requests(listener, handle, task="control request", metrics=metrics)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve, listener)
        if queue_directory is not None:
            nursery.start_soon(_keep_path, queue_directory, listener, serve, nursery)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        found = os.lstat(path)
    except OSError:
        return None
    return (found.st_dev, found.st_ino) if stat.S_ISSOCK(found.st_mode) else None


async def _keep_path(queue_directory: Path, listener: trio.SocketListener,
                     serve: Callable[[trio.SocketListener], Awaitable[None]], nursery: trio.Nursery) -> None:
    """Every ``KEEP_EVERY`` seconds: is the socket file still the one bound?  When it
    was removed or replaced (an operator's clean-up of the queue directory), bind a
    new one there and serve it instead: without it ``trimail status``, ``stop`` and
    ``reload`` said "not running", and ``sendmail``'s wake-up was lost (its mail
    waited for ``queue_run_delay``)."""
    path = queue_directory / CONTROL_NAME
    ours = _identity(path)
    failed = False
    while True:
        await trio.sleep(KEEP_EVERY)
        if ours is not None and _identity(path) == ours:
            continue
        try:
            fresh = await open_control_listener(queue_directory)
        except (ListenError, OSError) as exc:  # e.g. a directory put in its place: never the end of serve
            if not failed:
                log.warning("the control socket was removed or replaced, and cannot be bound again: %s", exc)
            failed = True
            continue
        failed = False
        ours = _identity(path)
        if ours is not None:  # (None: not ours to judge, a tmpfs without inodes: never the case on Linux)
            log.warning("control socket %s was removed or replaced: bound again", path)
        nursery.start_soon(serve, fresh)
        # the old one stops accepting; its requests in flight (a reload) run to their end
        close_now(listener)
        listener = fresh
