"""Small request/answer servers for the operator's endpoints (metrics, control socket).

``receive_until`` reads one bounded request.  ``serve_requests`` is the accept loop
both endpoints share, built so that no client can end ``serve``:

* every request runs in its own task, inside its own error boundary
  (``supervise.contained``): an unexpected exception costs that request, is logged on
  one line and counted in ``trimail_task_failures{task}``;
* a peer that resets, closes early or vanishes (``trio.BrokenResourceError``,
  ``trio.ClosedResourceError``, ``OSError``) is the peer's business: the request is
  dropped quietly (debug log only, so a reset flood cannot flood the mail log);
* at most *limit* requests are served at once (more wait in the listen backlog), and
  reading a request has a deadline, so silent clients cannot pile up tasks;
* the accept loop survives descriptor exhaustion (``net.listener.accept`` waits) and
  any other accept error (logged, then a growing pause, then accept again).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from trimail.net.listener import accept
from trimail.supervise import Backoff, FailureCounter, contained, report

log = logging.getLogger("trimail.master")

PEER_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


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


async def serve_requests(listener: trio.SocketListener, handle: Callable[[trio.SocketStream], Awaitable[None]],
                         *, task: str, metrics: FailureCounter | None = None, limit: int = 32) -> None:
    """Accept connections on *listener* until cancelled; ``await handle(stream)`` for
    each one in its own boundary (see the module docstring).  The stream is closed
    afterwards; *handle* sets its own deadlines."""
    limiter = trio.CapacityLimiter(limit)

    async def one(stream: trio.SocketStream) -> None:
        try:
            with contained(task, metrics):
                try:
                    await handle(stream)
                except PEER_GONE as exc:
                    log.debug("%s: client went away: %r", task, exc)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await trio.aclose_forcefully(stream)
            limiter.release_on_behalf_of(stream)

    backoff = Backoff(0.1, 5.0)
    async with listener, trio.open_nursery() as nursery:
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
            try:
                await limiter.acquire_on_behalf_of(stream)
            except BaseException:
                stream.socket.close()
                raise
            nursery.start_soon(one, stream)
