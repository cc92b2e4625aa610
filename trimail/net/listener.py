"""Opening the listening sockets named by ``smtpd_listen`` (IPv4 and IPv6), and
accepting from them without ever letting an accept error end serve.

trio's ``SocketListener.accept`` already skips the errors a connection that died
in the backlog produces (ECONNABORTED, EPROTO, ...).  ``accept()`` here also
survives the rest: descriptor or memory exhaustion (EMFILE, ENFILE, ENOBUFS,
ENOMEM) and any other ``OSError`` are logged once per episode and retried after a
delay that doubles from 0.05 s up to 1 s, so a full descriptor table is polled
gently and accepting resumes by itself when descriptors are free again.

Parameters: smtpd_listen, submission_listen, smtps_listen (through master.py).
"""

from __future__ import annotations

import errno
import logging

import trio

from trimail.config import ListenAddress
from trimail.supervise import Backoff

log = logging.getLogger("trimail.master")

BACKLOG = 1024
_RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


class ListenError(Exception):
    pass


async def open_listeners(addresses: list[ListenAddress]) -> list[trio.SocketListener]:
    listeners: list[trio.SocketListener] = []
    try:
        for address in addresses:
            try:
                opened = await trio.open_tcp_listeners(address.port, host=address.host, backlog=BACKLOG)
            except OSError as exc:
                raise ListenError(f"cannot listen on {address}: {exc.strerror or exc}") from None
            listeners.extend(opened)
    except BaseException:
        for listener in listeners:
            await listener.aclose()
        raise
    return listeners


def bound_address(listener: trio.SocketListener) -> ListenAddress:
    host, port, *_ = listener.socket.getsockname()
    return ListenAddress(host, port)


async def accept(listener: trio.SocketListener) -> trio.SocketStream:
    """Accept one connection; an accept error is logged and retried (with back-off),
    never raised.  ``trio.ClosedResourceError`` (the listener was closed) passes."""
    backoff = None  # made at the first error only: accept() runs once per connection
    while True:
        try:
            return await listener.accept()
        except OSError as exc:
            backoff = backoff or Backoff(0.05, 1.0)
            delay = backoff.next()
            if delay == backoff.initial:  # one line per episode, not per retry
                what = "out of resources" if exc.errno in _RESOURCE_ERRORS else "error"
                log.warning("accept: %s: %s; waiting before accepting more", what, exc.strerror or exc)
            await trio.sleep(delay)
