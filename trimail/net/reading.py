"""Small request/answer servers for the operator's endpoints (metrics, control socket).

``receive_until`` reads one bounded request.  ``serve_requests`` is the accept loop
both endpoints share, built so that no client can end ``serve``:

* every request runs in its own task, inside its own error boundary
  (``supervise.contained``): an unexpected exception costs that request, is logged on
  one line and counted in ``trimail_task_failures{task}``;
* a peer that resets, closes early or vanishes (``trio.BrokenResourceError``,
  ``trio.ClosedResourceError``, ``OSError``) is the peer's business: the request is
  dropped quietly (debug log only, so a reset flood cannot flood the mail log);
* at most *limit* connections are served at once (more wait in the listen backlog),
  and reading a request has a deadline, so silent clients cannot pile up tasks; the
  limit is large (256: a request is at most a few kB) because a flood of tricklers
  delays a newcomer by about (its place in the backlog) / *limit* seconds, but
  never above an eighth of the process's descriptors (``slots``);
* and slow ones cannot hold every slot either (slowloris): when all are taken, a new
  connection takes the place of the oldest one still sending its request after
  ``EVICT_AFTER`` seconds (a handler says its request is in with ``request_read()``;
  one whose answer is being made is never cut).  A real request is read in
  milliseconds, so only a client that trickles loses its slot, and only to a newcomer;
* the accept loop survives descriptor exhaustion (``net.listener.accept`` waits) and
  any other accept error (logged, then a growing pause, then accept again).
"""

from __future__ import annotations

import contextvars
import logging
import resource
from collections.abc import Awaitable, Callable

import trio

from trimail.net.listener import accept, close_now
from trimail.supervise import Backoff, FailureCounter, contained, report

log = logging.getLogger("trimail.master")

PEER_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
EVICT_AFTER = 1.0  # seconds a connection may spend sending its request before a newcomer may take its slot

_request_in: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar("request_in", default=None)


def request_read() -> None:
    """Called by a ``serve_requests`` handler once its whole request is in: from then
    on no newcomer takes its slot (no-op outside ``serve_requests``)."""
    done = _request_in.get()
    if done is not None:
        done()


async def receive_until(stream: trio.abc.ReceiveStream, marker: bytes, limit: int) -> bytes:
    """Bytes up to and including *marker* (and whatever came with it), at most about
    *limit* bytes; stops early at end of file.  The caller sets the time limit."""
    data = b""
    while marker not in data and len(data) < limit:
        chunk = await stream.receive_some(limit)
        if not chunk:
            break
        data += chunk
    return data


def slots(limit: int) -> int:
    """Connections served at once: *limit*, or an eighth of this process's descriptors
    when that is fewer (at least 4), read at each connection (``ulimit -n`` may be
    low, and ``prlimit`` can change it under a running serve): slow clients of one
    endpoint must leave descriptors for the sessions and the other endpoints (a
    metrics slowloris of 150 connections under a limit of 100 made ``trimail
    status`` say "not running")."""
    return min(limit, max(4, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 8))


async def serve_requests(listener: trio.SocketListener, handle: Callable[[trio.SocketStream], Awaitable[None]],
                         *, task: str, metrics: FailureCounter | None = None, limit: int = 256) -> None:
    """Accept connections on *listener* until cancelled; ``await handle(stream)`` for
    each one in its own boundary (see the module docstring).  The stream is closed
    afterwards; *handle* sets its own deadlines."""
    limiter = trio.CapacityLimiter(limit)
    # connections still sending their request, oldest first: stream -> (its scope, accepted at)
    reading: dict[trio.SocketStream, tuple[trio.CancelScope, float]] = {}

    async def one(stream: trio.SocketStream, scope: trio.CancelScope) -> None:
        _request_in.set(lambda: reading.pop(stream, None))
        try:
            with scope, contained(task, metrics):
                try:
                    await handle(stream)
                except PEER_GONE as exc:
                    log.debug("%s: client went away: %r", task, exc)
        finally:
            reading.pop(stream, None)
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await trio.aclose_forcefully(stream)
            limiter.release_on_behalf_of(stream)

    def evict_slowest() -> None:
        """Every slot taken: cut the oldest connection still sending its request, if it
        has been at it for EVICT_AFTER seconds."""
        if limiter.available_tokens or not reading:
            return
        stream, (scope, accepted) = next(iter(reading.items()))
        if trio.current_time() - accepted >= EVICT_AFTER:
            del reading[stream]
            scope.cancel()
            log.debug("%s: every slot taken: a client still sending its request after %.1f s makes way",
                      task, trio.current_time() - accepted)

    backoff = Backoff(0.1, 5.0)
    try:
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    stream = await accept(listener)
                except trio.ClosedResourceError:
                    return
                except OSError as exc:  # not descriptor exhaustion (accept waits for that): log, pause, go on
                    report(f"{task} accept", exc, metrics)
                    await trio.sleep(backoff.next())
                    continue
                backoff.reset()
                limiter.total_tokens = slots(limit)
                try:
                    while True:
                        evict_slowest()
                        with trio.move_on_after(EVICT_AFTER / 4):
                            await limiter.acquire_on_behalf_of(stream)
                            break
                except BaseException:
                    stream.socket.close()
                    raise
                scope = trio.CancelScope()
                reading[stream] = (scope, trio.current_time())
                nursery.start_soon(one, stream, scope)
    finally:
        close_now(listener)  # not aclose(): see close_now
