"""Opening the listening sockets named by ``smtpd_listen`` (IPv4 and IPv6)."""

from __future__ import annotations

import errno
import logging

import trio

from trimail.config import ListenAddress

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
    """Accept one connection; on descriptor exhaustion wait briefly instead of dying."""
    while True:
        try:
            return await listener.accept()
        except OSError as exc:
            if exc.errno not in _RESOURCE_ERRORS:
                raise
            log.warning("accept: %s; waiting before accepting more", exc.strerror)
            await trio.sleep(0.1)
