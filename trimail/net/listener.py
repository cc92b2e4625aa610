"""Opening the listening sockets named by ``smtpd_listen`` (IPv4 and IPv6), and
accepting from them without ever letting an accept error end serve.

trio's ``SocketListener.accept`` already skips the errors a connection that died
in the backlog produces (ECONNABORTED, EPROTO, ...).  ``accept()`` here also
survives the rest: descriptor or memory exhaustion (EMFILE, ENFILE, ENOBUFS,
ENOMEM) and any other ``OSError`` are logged once per episode and retried after a
delay that doubles from 0.05 s up to 1 s, so a full descriptor table is polled
gently and accepting resumes by itself when descriptors are free again.

With several smtpd workers on one listening socket, every connection wakes them
all and whichever is scheduled first takes it: with light load the connections
alternate between workers, each time waking a process that was idle (on this
2-core VM that cost a one-message connection about 0.3-0.7 ms against one worker).
So when a connection is pending only the worker whose turn it is (the session
board says whose: ``SessionBoard.accept_delay``) takes it at once; the others
(``DeferredAccept``) take it only once it has waited 1 ms more (10 ms under light
load, when that worker is idle) -- the worker whose turn it was is busy, stuck or
restarting.  One client at a time is
served by one warm worker; under load the sessions spread evenly.  A worker with
nothing to do under light load does not even watch the socket: it rests until the
board signals that the turn may be its own (processes.turns).  Postfix gets the
first half of this by starting smtpd processes on demand.

After a connection is taken, the next one is tried at once (after a checkpoint)
only when the worker is busy (``DeferredAccept``'s *busy*: more than one session of
its own); otherwise the accept loop waits for readability.  An ``accept()`` that
finds nothing, and its turn of the run loop, fell on a lone client's EHLO half the
time (trio runs a turn's tasks in random order): waiting instead, accept to
banner in the worker went from 100 to 88 us, and EHLO's p50 in ``scripts/bench
--mode latency`` (one message per connection) from 0.082-0.108 to 0.067-0.068 ms
with one worker and from 0.091 to 0.069-0.070 ms with two (sets of five runs);
the p99 of the whole transaction moved within its noise (1.8-3.6 ms either way).
Under load (100 sessions, one message per connection) waiting for each connection
cost 1-2 % more CPU than trying, so a busy worker still tries.

Parameters: smtpd_listen, submission_listen, smtps_listen (through master.py).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import resource
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from trimail.config.values import ListenAddress
from trimail.errors import ListenError
from trimail.net.stream import DirectStream
from trimail.supervise import Backoff

if TYPE_CHECKING:
    from trimail.processes.turns import Turns

log = logging.getLogger("trimail.master")

BACKLOG = 1024
# descriptors an SMTP connection may not take (the last of RLIMIT_NOFILE): 1/16, 8 to 64
HEADROOM_MIN, HEADROOM_MAX = 8, 64
_RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
# a connection that died in the backlog (what trio's SocketListener.accept skips too)
_GONE_ERRORS = {errno.ECONNABORTED, errno.EPERM, errno.EPROTO}


def close_now(listener: trio.SocketListener) -> None:
    """Close *listener* at once, as its ``aclose()`` does before the checkpoint that
    follows (which, in a task being cancelled, costs the stop two more turns of
    the scheduler per listener); a task blocked in its accept() is woken with
    ClosedResourceError.  Idempotent."""
    listener.socket.close()


async def open_listeners(addresses: list[ListenAddress]) -> list[trio.SocketListener]:
    listeners: list[trio.SocketListener] = []
    try:
        for address in addresses:
            try:
                opened = _open_numeric(address)
                if opened is None:  # a name (or a wildcard meaning both families): trio resolves it
                    opened = await trio.open_tcp_listeners(address.port, host=address.host, backlog=BACKLOG)
            except OSError as exc:
                raise ListenError(f"cannot listen on {address}: {exc.strerror or exc}") from None
            listeners.extend(opened)
    except BaseException:
        for listener in listeners:
            await listener.aclose()
        raise
    return listeners


def _open_numeric(address: ListenAddress) -> list[trio.SocketListener] | None:
    """The listener of an IP address literal, bound here as trio.open_tcp_listeners
    would (SO_REUSEADDR; IPv6 only on an IPv6 socket), without its two turns of the
    event loop (getaddrinfo and bind): a test MTA starts one at every test.  None for
    anything else."""
    try:
        ip = ipaddress.ip_address(address.host)
    except ValueError:
        return None
    sock = socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if ip.version == 6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address.host, address.port))
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return [trio.SocketListener(trio.socket.from_stdlib_socket(sock))]


def bound_address(listener: trio.SocketListener) -> ListenAddress:
    host, port, *_ = listener.socket.getsockname()
    return ListenAddress(host, port)


class DeferredAccept:
    """Accepting for one of several workers on one listening socket: wait until a
    connection is pending; take it once *turns.defer()* returns if it is still
    waiting (at once when it is this worker's turn; else the others' time to take
    it first; *turns* None: the only worker, always at once).  Before it watches
    the socket it lets *turns.rest()* return (a worker with nothing to do rests).
    After taking one, the next try does not rest first (more may be waiting, and
    the new session has not counted itself yet); when *busy()* says the worker has
    sessions enough that more connections are likely waiting, it tries after a
    checkpoint, else it waits for readability (see the module docstring).
    Each connection comes as a ``net.stream.DirectStream``.

    The last descriptors of ``RLIMIT_NOFILE`` (1/16 of it, 8 to 64, at most half of
    those free when the listener was taken up) are not for new connections.
    Descriptors are numbered lowest free first, so a connection's number is a
    floor of the descriptors open: once one took the last descriptor
    below the ceiling, the next accept first asks a ``dup`` of the socket where the
    lowest free one is, and while that is at the ceiling it accepts nothing
    (reported as EMFILE, which turns stress on: ``accept``'s *exhausted*) and the
    connections wait in the backlog, as with EMFILE itself.  The descriptors kept
    let the sessions in progress open their spool files and tables, and the control
    socket and the metrics endpoint of this process accept (with ``smtpd_workers =
    0``, idle clients holding every descriptor made ``trimail status`` say "not
    running" until stress cut them)."""

    def __init__(self, listener: trio.SocketListener, turns: Turns | None = None,
                 busy: Callable[[], bool] = lambda: True) -> None:
        self.listener = listener
        self.turns = turns
        self.busy = busy
        # a second descriptor of the same socket, to try accept() without waiting
        self._raw = socket.socket(fileno=os.dup(listener.socket.fileno()))
        self._raw.setblocking(False)
        self._more = False  # the last try took one: there may be more waiting
        self._full = False  # the last connection took the last descriptor below the ceiling
        self._base = self._raw.fileno()  # about the descriptors held before any session

    def close(self) -> None:
        self._raw.close()

    async def __call__(self) -> DirectStream:
        while True:
            if self._more and self.busy():  # more are likely waiting: try at once, after a pass
                await trio.lowlevel.checkpoint()
            elif self._more:  # usually none: wait for one, without an accept() that finds none
                await trio.lowlevel.wait_readable(self.listener.socket)
            else:
                if self.turns is not None:
                    await self.turns.rest()
                await trio.lowlevel.wait_readable(self.listener.socket)
            if self.turns is not None:
                await self.turns.defer()
            if self._full and not self._room():  # the connection waits in the backlog
                self._more = False
                raise OSError(errno.EMFILE, os.strerror(errno.EMFILE) + " (the last ones are kept for the "
                                            "sessions in progress and the control socket)")
            try:
                connection, _ = self._raw.accept()
            except BlockingIOError:
                self._more = False
                continue
            except OSError as exc:
                self._more = False
                if exc.errno in _GONE_ERRORS:
                    continue
                raise
            self._more = True
            self._full = connection.fileno() >= _ceiling(self._base) - 1
            return DirectStream(connection)

    def _room(self) -> bool:
        """Is the lowest free descriptor below the ceiling (a ``dup`` tells)?"""
        probe = os.dup(self._raw.fileno())
        os.close(probe)
        self._full = probe >= _ceiling(self._base)
        return not self._full


def _ceiling(base: int) -> int:
    """The lowest descriptor number a new SMTP connection may not have: the last of
    ``RLIMIT_NOFILE`` are kept (see ``DeferredAccept``), but never more than half of
    what is left above *base* (the descriptors the process holds without sessions)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return 1 << 62
    return soft - min(HEADROOM_MAX, max(HEADROOM_MIN, soft // 16), max(0, soft - base) // 2)


async def accept(listener: trio.SocketListener, deferred: DeferredAccept | None = None,
                 exhausted: Callable[[], None] | None = None) -> trio.SocketStream | DirectStream:
    """Accept one connection (through *deferred* when given); an accept error is
    logged and retried (with back-off), never raised; *exhausted* is called when it
    was for want of descriptors (EMFILE, ENFILE: ``Anvil.out_of_descriptors``).
    ``trio.ClosedResourceError`` (the listener was closed) passes."""
    backoff = None  # made at the first error only: accept() runs once per connection
    while True:
        try:
            return await (deferred() if deferred is not None else listener.accept())
        except OSError as exc:
            if exhausted is not None and exc.errno in (errno.EMFILE, errno.ENFILE):
                exhausted()
            backoff = backoff or Backoff(0.05, 1.0)
            delay = backoff.next()
            if delay == backoff.initial:  # one line per episode, not per retry
                what = "out of resources" if exc.errno in _RESOURCE_ERRORS else "error"
                log.warning("accept: %s: %s; waiting before accepting more", what, exc.strerror or exc)
            await trio.sleep(delay)
