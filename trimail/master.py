"""serve(): the top nursery of a running trimail (master(8) with ``smtpd_workers = 0``).

Structure (nurseries are the architecture)::

    serve
    ├── QueueWriter thread            (group commit; the one writing connection)
    └── top nursery
        ├── Scheduler.run             (the queue manager, unless master_service_disable)
        ├── clean_cache               (the address-verification cache's expiry; none for a
        │                              test queue holding its cache: both go within seconds)
        └── session nursery           (one task per SMTP connection)
            └── listener nursery      (one accept loop per smtpd_listen socket,
                                       the control socket (none for a test MTA),
                                       the metrics endpoint)

Start it with ``await nursery.start(serve, config)``; it reports readiness with the
``Server`` handle (trimail.service) once every listener is bound, and tells
systemd (``READY=1``, ``STOPPING=1``).  ``Server.stop()`` begins a graceful stop
(``serve_sessions``, which an smtpd worker runs too): the listeners close first
(no new connections), idle sessions get ``421`` at once, sessions inside a
transaction get ``graceful_timeout`` to finish, then the rest get ``421`` too;
deliveries in flight are cancelled and their messages go back to ``incoming``;
the database is closed last.

Start-up order (``serve``, its steps in trimail.startup): the queue lock; the
queue database, opened and recovered, so a queue that cannot be opened ends serve
with one fatal line before any port is open (no client is accepted and then
reset); the TLS certificate, loaded once as root and outside any jail (same rule);
the SMTP listeners, the control socket and the metrics endpoint; then, started as
root, the root local delivery helper and ``mail_owner`` and with ``chroot = yes``
the jail; then the tasks.  Only errors at start (exit 1, or 2 for configuration)
and an explicit stop end serve; the control socket and the metrics endpoint serve
each request inside its own error boundary.

Parameters: master_service_disable, address_verify_map, graceful_timeout (plus what trimail.startup and
trimail.service read).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import trio

from trimail import __version__
from trimail.commands import control_commands
from trimail.config import Config
from trimail.net.http import serve_metrics
from trimail.net.listener import bound_address, close_now
from trimail.policy.verifycleanup import clean_cache
from trimail.postqueue import address
from trimail.public import PublicSocket, serve_operators
from trimail.queue.reserve import QueueReserve
from trimail.queue.reserve import keep as keep_reserve
from trimail.queue.store import Store
from trimail.queue.verifycache import cache_file
from trimail.service import Server
from trimail.startup import Endpoint, become_mail_owner, open_endpoints, opened_queue

log = logging.getLogger("trimail.master")


def notify_systemd(message: bytes) -> None:
    """sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET, if set."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    import socket

    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message, address)
    except OSError as exc:
        log.warning("cannot notify systemd through %s: %s", path, exc)


async def serve_sessions(server: Server, listeners: list[Endpoint],
                         started: Callable[[trio.Nursery], None], stopping: Callable[[], None] = lambda: None,
                         ) -> None:
    """Accept on *listeners* until ``server.stop()``, then drain: the listeners
    close first, idle sessions get ``421`` at once, busy ones after
    ``graceful_timeout``.  *started* runs once the accept loops are in place (it
    may start more request loops in the nursery it gets; they end with them)."""
    async with trio.open_nursery() as sessions:
        async with trio.open_nursery() as accepting:
            server._accepting, server._sessions = accepting, sessions
            server.start_listening(listeners)
            started(accepting)
            await server._stop.wait()
            stopping()
            accepting.cancel_scope.cancel()
        await server._drain()


def _cache_goes_with_the_queue(config: Config, queue_directory: str) -> bool:
    """The address-verification cache is a file in the queue directory: for a test
    queue (trimail.testing), both are deleted within seconds, long before any expiry
    run is due, so no task waits for one."""
    try:
        path = cache_file(config.address_verify_map)
    except ValueError:
        return False
    return path is not None and os.path.dirname(path) == os.fspath(queue_directory)


async def serve(config: Config, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the MTA until ``Server.stop()``; readiness is reported with the Server.

    Start-up order: the queue lock, the queue database (opened and recovered: a
    queue that cannot be opened ends serve with one line before any port is open),
    the TLS certificate (``preflight``), then the listeners, then mail_owner and
    the jail, then the tasks."""
    async with opened_queue(config) as queue:
        listeners, control, metrics_listeners = await open_endpoints(config, queue.directory, control=not queue.test)
        public_name = address(queue.directory)  # named before the jail, as the users' tools name it
        try:
            config, queue.directory = become_mail_owner(config, queue.directory)
            writer = queue.writer
            server = Server(config, writer, listeners)
        except BaseException:  # (a bad restriction list, say): no socket stays open in an embedding process
            for listener in [*(entry[0] for entry in listeners), *metrics_listeners, *([control] if control else [])]:
                close_now(listener)
            raise
        async with trio.open_nursery() as top:
            if "qmgr" not in config.master_service_disable:
                await top.start(server.scheduler.run)
                if not queue.test:  # a test queue is deleted within seconds
                    reserve = QueueReserve(queue.directory)
                    writer.on_no_space = reserve.release
                    top.start_soon(keep_reserve, reserve)
            else:
                log.info("qmgr disabled by master_service_disable: mail stays queued")
            if not (queue.test and _cache_goes_with_the_queue(config, queue.directory)):
                top.start_soon(clean_cache, lambda: server.config)  # the verification cache's expiry

            def started(accepting: trio.Nursery) -> None:
                if control is not None:  # none for a test MTA (trimail.startup)
                    accepting.start_soon(serve_operators, control, control_commands(server), server.metrics,
                                         Path(queue.directory), lambda: server.config, PublicSocket(public_name))
                for listener in metrics_listeners:
                    accepting.start_soon(serve_metrics, listener, server.metrics, server.refresh_metrics)
                    server.metrics_addresses.append(bound_address(listener))
                if server.metrics_addresses:
                    log.info("metrics endpoint listening on %s", ", ".join(map(str, server.metrics_addresses)))
                log.info("daemon started -- version %s, configuration %s, listening on %s",
                         __version__, config.source, ", ".join(map(str, server.addresses)))
                task_status.started(server)
                notify_systemd(b"READY=1")

            await serve_sessions(server, listeners, started, lambda: notify_systemd(b"STOPPING=1"))
            await server.scheduler.finish(server.config.graceful_timeout)
            top.cancel_scope.cancel()  # deliveries still in flight stop; their messages go back below
        if "qmgr" not in config.master_service_disable:  # without it, nothing was ever taken for delivery
            returned = await writer.run(Store.recover_active)
            if returned:
                log.info("%d message(s) in delivery returned to the incoming queue", returned)
        stats = writer.stats
        log.info("queue writer: %d commits for %d requests, largest batch %d, %.3f s committing",
                 stats.batches, stats.requests, stats.largest_batch, stats.commit_seconds)
        log.info("terminating on stop request")

