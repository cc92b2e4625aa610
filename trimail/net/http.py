"""The ``metrics_listen`` endpoint: a minimal HTTP/1.0 responder on trio.

``GET /metrics`` (any path) answers the Prometheus text exposition format of
trimail.metrics; any other method gets ``405``, and ``503`` when the queue cannot
be read (the reason goes to the log, never to the client).  Requests are bounded
in size (8 KiB) and time (10 s), and each one runs in its own error boundary
(``net.reading.serve_requests``), so a client that resets mid-request or sends
garbage costs that request only (``trimail_task_failures{task="metrics request"}``
counts the unexpected ones).  serve binds the ``metrics_listen`` socket and
passes the listener in.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from trimail.metrics import Metrics
from trimail.net.reading import receive_until, request_read, serve_requests
from trimail.supervise import report

MAX_REQUEST = 8192
REQUEST_TIMEOUT = 10.0  # seconds for one request, reading and answering


async def serve_metrics(listener: trio.SocketListener, metrics: Metrics,
                        refresh: Callable[[], Awaitable[None]],
                        exposition: Callable[[], Awaitable[bytes]] | None = None) -> None:
    """Answer each connection with the current metrics, each request in its own
    error boundary (``net.reading.serve_requests``): a client that resets or sends
    garbage costs its own request only.  When the queue cannot be read the answer
    is ``503`` and the reason goes to the log, never to the client."""

    async def handle(stream: trio.SocketStream) -> None:
        with trio.move_on_after(REQUEST_TIMEOUT):
            request = await receive_until(stream, b"\r\n\r\n", MAX_REQUEST)
            request_read()
            if b"\r\n\r\n" not in request:  # cut short (end of file) or over-long: nothing was asked
                return
            if not request.startswith(b"GET "):
                await stream.send_all(b"HTTP/1.0 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
                return
            try:
                await refresh()
            except Exception as exc:  # noqa: BLE001 - the queue is unreadable now: say so without details
                report("metrics refresh", exc, metrics)
                await stream.send_all(b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
                return
            body = metrics.exposition() if exposition is None else await exposition()
            head = (f"HTTP/1.0 200 OK\r\nContent-Type: {CONTENT_TYPE_LATEST}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
            await stream.send_all(head + body)

    await serve_requests(listener, handle, task="metrics request", metrics=metrics)
