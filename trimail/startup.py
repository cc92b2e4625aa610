"""The start-up steps of a serve, which both process models share (master.serve and
trimail.processes.serve, whose workers take the last ones: trimail.processes.worker).

In order (``opened_queue``): the open-files limit raised to the hard limit (each
SMTP session holds one descriptor); the queue directory, created 0700; the queue lock (``$queue_directory/pid/master.pid``,
in a directory only root writes, opened without following links: trimail.queue.lock);
the start-time warnings (trimail.check); the queue database, opened, migrated and
recovered (``recover``: messages an earlier run left ``active`` go back to
``incoming``), so a queue that cannot be opened ends serve with one fatal line
before any port is open (no client is accepted and then reset); the TLS
certificate (``preflight``), loaded once as root and outside any jail (same rule).
Then ``open_endpoints`` binds the SMTP listeners (``LISTENERS``: the services and
the parameter with their addresses), the control socket (none for a test queue:
a test MTA is driven through its Python object, never by ``trimail stop`` or
``reload``) and the metrics endpoint, closing those already open when one cannot
be bound; and ``become_mail_owner``,
started as root, starts the root local delivery helper
(trimail.delivery.local.privileged), enters the jail with ``chroot = yes`` (the
mail log stays open across it, see trimail.log) and drops to ``mail_owner``.

Security: the lock file lives where only root writes and is never followed through
a link; the certificate and the listeners are opened before privileges are
dropped, so neither the jail nor ``mail_owner`` needs access to them; ``allow_root
= yes`` (test suites and development only) keeps root and says so in the log.

Parameters: queue_directory, queue_busy_timeout, smtpd_tls_cert_file, smtpd_listen,
submission_listen, smtps_listen, reinject_listen, metrics_listen, mail_owner, allow_root, chroot.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import trio

from trimail import log as maillog
from trimail import userlists
from trimail.check import warnings as check_warnings
from trimail.config import Config
from trimail.config.values import ListenAddress
from trimail.delivery.local import privileged
from trimail.errors import StorageError
from trimail.net.control import open_control_listener
from trimail.net.listener import open_listeners
from trimail.net.tls import server_tls_context
from trimail.privileges import drop_privileges
from trimail.queue.database import QueueError, is_test_queue, prepare_directory
from trimail.queue.guards import index_identity
from trimail.queue.inline import InlineWriter
from trimail.queue.lock import QueueLock
from trimail.queue.reserve import QueueReserve
from trimail.queue.store import Store
from trimail.queue.writer import QueueWriter
from trimail.supervise import describe

log = logging.getLogger("trimail.master")

# (session kind, parameter with its addresses): port 25, 587 (STARTTLS, AUTH), 465 (implicit TLS),
# and where a content filter gives mail back (Postfix's 127.0.0.1:10025 smtpd, reinject_overrides)
LISTENERS = (("smtp", "smtpd_listen"), ("submission", "submission_listen"), ("smtps", "smtps_listen"),
             ("reinject", "reinject_listen"))
# an open SMTP listener: (listener, session kind, configured address)
Endpoint = tuple[trio.SocketListener, str, ListenAddress]


def raise_descriptor_limit() -> None:
    """Use the hard limit for open files: each SMTP session holds one descriptor."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open files limit from %d to %d: %s", soft, hard, exc)


class OpenedQueue:
    """The queue as serve holds it: its directory (``/`` once inside the jail: the
    writer's connections read it when they open), the lock and the writer."""

    def __init__(self, directory: str, lock: QueueLock, busy_timeout: float) -> None:
        self.directory = directory
        self.lock = lock
        self.busy_timeout = busy_timeout
        self.writer: QueueWriter
        self.index: tuple[int, ...] | None = None  # the WAL's and its index's files (guards.index_identity)
        self.test = is_test_queue(directory)  # trimail.testing's: never fsynced, never shared, no control socket

    def open_store(self) -> Store:
        return Store.open(self.directory, busy_timeout=self.busy_timeout)


@contextlib.asynccontextmanager
async def opened_queue(config: Config) -> AsyncIterator[OpenedQueue]:
    """The start-up steps both process models share, in order: the descriptor
    limit, the queue lock, the start-time warnings, the queue database (opened,
    migrated, recovered: a queue that cannot be opened ends serve with one line
    before any port is open) and the TLS certificate (``preflight``).  The lock is
    released when the block ends."""
    raise_descriptor_limit()
    directory: str = config.queue_directory  # a string: Path's parsing is not free, and this runs at each start
    prepare_directory(directory)
    lock = QueueLock(directory)
    lock.acquire()
    try:
        for warning in start_warnings(config):
            log.warning("%s", warning)
        queue = OpenedQueue(directory, lock, config.queue_busy_timeout)
        # a test queue commits in the event loop (InlineWriter) and opens its reading connections on first use
        writer_class, readers = (InlineWriter, 0) if queue.test else (QueueWriter, None)
        async with writer_class(queue.open_store, readers_at_start=readers) as writer:
            queue.writer = writer
            try:
                if not queue.test:  # a test queue is a fresh copy of an empty one: nothing to recover
                    await recover(writer, directory)
                    # the WAL index every process of this serve maps: no other opening while it is gone
                    queue.index = index_identity(directory)
                    try:
                        lock.record_index(queue.index)
                    except OSError as exc:  # (a full queue file system): the guard is weaker, mail goes on
                        log.warning("cannot record the queue index serve has open (%s): sendmail and the queue "
                                    "commands will not notice a queue.db-wal or -shm replaced under serve",
                                    exc.strerror or exc)
                preflight(config)
                yield queue
            finally:
                del queue.writer  # (it holds queue.open_store: no cycle left for the garbage collector)
    finally:
        lock.release()


def start_warnings(config: Config) -> list[str]:
    """What ``trimail check`` would warn about, logged at every start (found once per
    set of options for test MTAs: ``Config.start_warnings``)."""
    if config.start_warnings is not None:
        return config.start_warnings
    return check_warnings(config, handing_over=os.geteuid() == 0 and not config.allow_root)


async def recover(writer: QueueWriter, queue_directory: str) -> None:
    """Messages an earlier run left ``active`` go back to ``incoming``; a queue that
    cannot even do that is a QueueError (one fatal line at start).  A file system
    that is full gives up the queue manager's space reserve for it first."""
    try:
        try:
            recovered = await writer.run(Store.recover_active)
        except StorageError as exc:
            if not exc.no_space:
                raise
            # what the queue manager's reserve is for (queue.reserve): its own process makes it whole again
            await trio.to_thread.run_sync(QueueReserve(queue_directory).release)
            recovered = await writer.run(Store.recover_active)
    except QueueError:
        raise
    except Exception as exc:  # noqa: BLE001 - the database opened but cannot be written
        raise QueueError(f"{os.path.join(queue_directory, 'queue.db')}: {describe(exc)}") from None
    if recovered:
        log.info("recovered %d message(s) left active by an earlier run", recovered)


def preflight(config: Config) -> None:
    """What would make the Server fail at start is found before any port is open:
    the TLS certificate is loaded once here (ConfigError: exit 2, one line).  This
    is also the last moment it can be read as root and outside the jail."""
    if config.smtpd_tls_cert_file:
        server_tls_context(config)


async def open_endpoints(config: Config, queue_directory: str, *, control: bool = True,
                         ) -> tuple[list[Endpoint], trio.SocketListener | None, list[trio.SocketListener]]:
    """Bind every SMTP listener, the control socket (unless not *control*) and the
    metrics endpoint; when one cannot be opened, those already open are closed and
    ListenError raised."""
    opened: list[trio.SocketListener] = []
    try:
        listeners: list[Endpoint] = []
        for kind, parameter in LISTENERS:
            for address in config.get(parameter):
                for listener in await open_listeners([address]):
                    opened.append(listener)
                    listeners.append((listener, kind, address))
        control_listener = await open_control_listener(Path(queue_directory)) if control else None
        if control_listener is not None:
            opened.append(control_listener)
        metrics_listeners = await open_listeners(config.metrics_listen)
    except BaseException:
        with trio.CancelScope(shield=True):
            for listener in opened:
                await listener.aclose()
        raise
    return listeners, control_listener, metrics_listeners


def become_mail_owner(config: Config, queue_directory: str, *, helper: bool = True,
                      handed_over: bool = False) -> tuple[Config, str]:
    """Started as root: start the root delivery helper (when file or command
    targets are allowed or virtual(8) mailboxes are configured:
    trimail.delivery.local.privileged), then become
    mail_owner (entering the chroot jail first when ``chroot = yes``, with the
    password file's names kept for trimail/userlists.py), unless
    ``allow_root``.  Returns the configuration and the
    queue directory as serve sees them from now on (``/`` inside the jail).  The
    mail log file stays open across the switch (trimail.log)."""
    if os.geteuid() != 0:
        return config, queue_directory
    if config.allow_root:
        log.warning("running as root: allow_root = yes (development and test suites only)")
        return config, queue_directory
    if helper and privileged.needed(config):
        try:  # the root part of delivery: /file, |command targets and virtual mailboxes as their owners
            privileged.start(config)
        except OSError as exc:
            log.warning("cannot start the root delivery helper (file and command targets and virtual mailboxes "
                        "of other uids will be deferred): %s", exc)
    if config.chroot:  # the password file stays outside: the authorized_* lists' names (userlists)
        userlists.remember_names()
    with maillog.entering_jail(Path(queue_directory)) if config.chroot else contextlib.nullcontext():
        drop_privileges(config.mail_owner, Path(queue_directory), config.chroot, handed_over=handed_over)
    if config.chroot:  # trimail.check warned at start about files the jail hides
        config = config.with_overrides({"queue_directory": "/"})
        queue_directory = "/"
    log.info("running as %s%s", config.mail_owner, " in a chroot jail" if config.chroot else "")
    return config, queue_directory
