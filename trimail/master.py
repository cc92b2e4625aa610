"""serve(): the top nursery of a running trimail.

Structure (nurseries are the architecture)::

    serve
    ├── QueueWriter thread            (group commit; the one writing connection)
    └── session nursery               (one task per SMTP connection)
        └── listener nursery          (one accept loop per smtpd_listen socket,
                                       the control socket, the metrics endpoint)

Start it with ``await nursery.start(serve, config)``; it reports readiness with the
``Server`` handle once every listener is bound.  ``Server.stop()`` begins a
graceful stop: the listeners close first (no new connections), idle sessions get
``421`` at once, sessions inside a transaction get ``graceful_timeout`` to finish,
then the rest get ``421`` too; the database is closed last.

Start-up order (``serve``): the queue lock (``$queue_directory/pid/master.pid``,
in a directory only root writes, opened without following links: trimail.queue.lock);
the queue database, opened and
recovered, so a queue that cannot be opened ends serve with one fatal line before
any port is open (no client is accepted and then reset); the TLS certificate,
loaded once as root and outside any jail (same rule); the SMTP listeners, the
control socket and the metrics endpoint; then, started as root, the root local
delivery helper (trimail.delivery.local.privileged) and ``mail_owner``
and with ``chroot = yes`` the jail (``become_mail_owner``: the mail log stays
open across it, see trimail.log); then the tasks.  Only errors at start (exit 1,
or 2 for configuration) and an explicit stop end serve; the control socket and
the metrics endpoint serve each request inside its own error boundary.

Parameters: queue_directory, smtpd_listen, submission_listen, smtps_listen,
metrics_listen, mail_owner, allow_root, chroot, master_service_disable,
smtpd_timeout, smtpd_soft_error_limit, smtpd_error_sleep_time,
smtpd_client_connection_count_limit, smtpd_client_connection_rate_limit,
smtpd_process_limit, graceful_timeout, smtpd_stress_threshold, smtpd_junk_command_limit,
smtpd_hard_error_limit, smtpd_tls_handshake_timeout, smtpd_greet_pause, queue_busy_timeout,
smtpd_session_deadline, smtpd_peername_lookup, smtpd_tls_cert_file, dns_nameservers,
dns_concurrency_limit (plus everything trimail.receive reads).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import trio
from prometheus_client import Gauge

from trimail import __version__, anvil
from trimail import config as configuration
from trimail import log as maillog
from trimail.check import warnings as check_warnings
from trimail.config import Config, ConfigError
from trimail.config.values import ListenAddress
from trimail.delivery.local import privileged
from trimail.delivery.smtp import Connector
from trimail.maps import TableError
from trimail.metrics import Metrics
from trimail.net.control import open_control_listener, serve_control
from trimail.net.dns import Resolver
from trimail.net.http import serve_metrics
from trimail.net.listener import DeferredAccept, ListenError, accept, bound_address, open_listeners
from trimail.net.session import Session, SessionLimits
from trimail.net.stream import DirectStream
from trimail.net.tls import server_tls_context
from trimail.peername import PeerNames
from trimail.policy.restrictions import restriction_lists
from trimail.policy.verify import Verifier, clean_cache
from trimail.privileges import drop_privileges
from trimail.qshape import dead_destinations
from trimail.queue.database import QueueError, prepare_directory
from trimail.queue.lock import QueueLock
from trimail.queue.store import Store
from trimail.queue.writer import QueueWriter
from trimail.receive.context import ReceiveContext
from trimail.receive.session import SmtpdSession
from trimail.scheduler import Scheduler
from trimail.scheduler.trigger import QmgrTrigger
from trimail.smtp import replies
from trimail.supervise import contained, describe

log = logging.getLogger("trimail.master")

# (session kind, parameter with its addresses): port 25, 587 (STARTTLS, AUTH), 465 (implicit TLS)
LISTENERS = (("smtp", "smtpd_listen"), ("submission", "submission_listen"), ("smtps", "smtps_listen"))


def peer_resolver(config: Config) -> Resolver:
    """The resolver of client-name lookups: one per session at most, so as many at once
    as sessions (smtpd_process_limit), never waiting for the policy checks' lookups
    (dns_concurrency_limit) nor making them wait: clients whose reverse zones never
    answer cost only their own sessions, as with Postfix's one lookup per smtpd."""
    return Resolver(config.dns_nameservers, concurrency=max(1, config.smtpd_process_limit))


class Server:
    """Handle on a running serve: where it listens, and how to stop it.

    Each accepted connection runs in ``_handle`` inside its own boundary
    (``supervise.contained``): a reset before ``getpeername()``, or any error the
    session did not expect, costs that connection only, and its accounting in
    ``anvil`` is undone in ``finally``.  The accept loops never end on an accept
    error (``net.listener.accept``).  Admission (process, per-client count and
    rate limits) and the stress level live in ``trimail.anvil``; when stress mode
    turns on, every open session gets ``stress_limits`` at once (idle ones are cut
    after the stress ``smtpd_timeout``), and ``status()`` and the
    ``trimail_smtpd_stress`` gauge show it.
    """

    def __init__(self, config: Config, writer: QueueWriter,
                 listeners: list[tuple[trio.SocketListener, str, ListenAddress]],
                 trigger: QmgrTrigger | None = None, shared_sessions: anvil.SharedCount | None = None,
                 shared_clients: anvil.SharedClients | None = None,
                 accept_at_once: Callable[[], bool] | None = None) -> None:
        self.config = config
        self.writer = writer
        # one of several smtpd workers: whether it is its turn to accept (net.listener.DeferredAccept)
        self.accept_at_once = accept_at_once
        # (kind, configured address) -> its open listeners, each with the scope of its accept loop
        self.listening: dict[tuple[str, str], list[tuple[trio.SocketListener, trio.CancelScope]]] = {}
        self._accepting: trio.Nursery | None = None
        self._sessions: trio.Nursery | None = None
        self.addresses: list[ListenAddress] = []
        self.addresses_by_kind: dict[str, list[ListenAddress]] = {}
        for listener, kind, _ in listeners:
            address = bound_address(listener)
            self.addresses.append(address)
            self.addresses_by_kind.setdefault(kind, []).append(address)
        resolver = Resolver(config.dns_nameservers, concurrency=config.dns_concurrency_limit)
        self.peer_resolver = peer_resolver(config)
        # the queue manager in this process, or (an smtpd worker) the trigger that wakes the qmgr worker's
        self.scheduler = Scheduler(config, writer, Connector(config, resolver, lambda: self.addresses))
        self.handing_over: Scheduler | QmgrTrigger = self.scheduler if trigger is None else trigger
        auth_failures = anvil.AuthFailures(shared_clients)  # every worker's, given the client board
        self.contexts = {kind: ReceiveContext(config, writer, scheduler=self.handing_over, resolver=resolver,
                                              kind=kind, auth_failures=auth_failures)
                         for kind in {kind for _, kind, _ in listeners} | {"smtp"}}
        self.context = self.contexts["smtp"]
        # one address-verification cache and probe limit for every listener, kept across reloads
        self.verifier = Verifier(config, resolver)
        for context in self.contexts.values():
            context.policy.verifier = self.verifier
        self.metrics = Metrics()
        self.metrics.sessions.set_function(lambda: len(self.sessions))
        for context in self.contexts.values():
            context.metrics = self.metrics
        self.scheduler.metrics = self.metrics
        self.metrics.dead.set_function(lambda: len(self.scheduler.dead.snapshot(time.time())))
        writer.on_commit = self.metrics.commit
        self.sessions: set[Session] = set()
        self.anvil = anvil.Anvil(config, shared_sessions, shared_clients)
        self.peer_names = PeerNames()  # verified client names, cached across sessions (smtpd_peername_lookup)
        self.limits = SessionLimits.from_config(config)
        self.stress_limits = SessionLimits.from_config(config, stress=True)
        self.stress_gauge = Gauge("trimail_smtpd_stress", "1 while the SMTP service is under stress (STRESS_README)",
                                  registry=self.metrics.registry)
        self.started = time.monotonic()
        self.reloads = 0
        self.metrics_addresses: list[ListenAddress] = []
        self._stop = trio.Event()
        self._stop_now = trio.Event()
        self.retiring = False
        self._idle = trio.Event()
        self._idle.set()

    def control_commands(self) -> dict[str, Callable[[], Any]]:
        def flush() -> str:
            self.scheduler.dead.flush()  # a flush tries dead sites again (Postfix's QMGR_REQ_FLUSH_DEAD)
            self.scheduler.wake()
            return "ok"

        def wake() -> str:  # hold/release/delete/requeue: no flush (postsuper never unthrottles)
            self.scheduler.wake()
            return "ok"

        def stop() -> str:
            self.stop()
            return "ok"

        return {"flush": flush, "wake": wake, "ping": lambda: "ok", "reload": self.reload, "stop": stop,
                "status": self.status, "dead": lambda: json.dumps(self.dead_destinations())}

    def dead_destinations(self) -> dict[str, Any]:
        """The destinations the queue manager holds dead now (``trimail queue summary``,
        ``trimail status``): ``{"total": N, "dead": [...]}``, bounded (trimail.qshape)."""
        return dead_destinations(self.scheduler.dead.snapshot(time.time()))

    def start_listening(self, listeners: list[tuple[trio.SocketListener, str, ListenAddress]]) -> None:
        assert self._accepting is not None and self._sessions is not None
        for listener, kind, configured in listeners:
            scope = trio.CancelScope()
            self.listening.setdefault((kind, str(configured)), []).append((listener, scope))
            self._accepting.start_soon(self._accept_loop, listener, kind, self._sessions, scope)

    def _recount_addresses(self) -> None:
        self.addresses, self.addresses_by_kind = [], {}
        for (kind, _), entries in self.listening.items():
            for listener, _ in entries:
                address = bound_address(listener)
                self.addresses.append(address)
                self.addresses_by_kind.setdefault(kind, []).append(address)

    async def reload(self) -> str:
        """Re-read main.cf and tables; new sessions and deliveries use them, sessions
        in progress keep theirs; listeners that appeared in the configuration are
        opened and those that disappeared are closed.  A broken configuration (or a
        new address that cannot be bound) is refused: the old configuration stays."""
        opened: list[tuple[trio.SocketListener, str, ListenAddress]] = []
        try:
            fresh = configuration.load(self.config.path, self.config.overrides)
            restriction_lists(fresh)
            resolver = Resolver(fresh.dns_nameservers, concurrency=fresh.dns_concurrency_limit)
            fresh_peer_resolver = peer_resolver(fresh)
            contexts = {kind: ReceiveContext(fresh, self.writer, scheduler=self.handing_over, resolver=resolver,
                                             kind=kind, auth_failures=self.context.auth_failures)
                        for kind in {kind for kind, _ in LISTENERS}}
            wanted = {(kind, str(address)): address for kind, parameter in LISTENERS
                      for address in fresh.get(parameter)}
            for key, address in wanted.items():
                if key not in self.listening:
                    opened += [(listener, key[0], address) for listener in await open_listeners([address])]
            self.scheduler.reconfigure(fresh)
            self.verifier.reconfigure(fresh, resolver)
        except (ConfigError, TableError, OSError, ListenError) as exc:
            for listener, _, _ in opened:
                await listener.aclose()
            log.error("reload refused, keeping the running configuration: %s", exc)
            return f"error: {exc}"
        self.start_listening(opened)
        for key in [key for key in self.listening if key not in wanted]:
            for _, scope in self.listening.pop(key):
                scope.cancel()  # the accept loop closes its listener; sessions go on
        self._recount_addresses()
        hooks = self.context.hooks
        for context in contexts.values():
            context.hooks = hooks
            context.metrics = self.metrics
            context.policy.verifier = self.verifier
        self.config = fresh
        self.peer_resolver = fresh_peer_resolver
        if self.anvil.configure(fresh) is False:
            self._stress_changed()
        self.limits = SessionLimits.from_config(fresh)
        self.stress_limits = SessionLimits.from_config(fresh, stress=True)
        self.contexts = contexts
        self.context = contexts["smtp"]
        self.reloads += 1
        log.info("reload -- version %s, configuration %s", __version__, fresh.source)
        return "ok"

    async def refresh_metrics(self) -> None:
        """Queue sizes and the oldest message's age, read when the endpoint is scraped."""
        counts, oldest = await self.writer.read(lambda store: (store.counts(), store.oldest_arrival()))
        for state in ("maildrop", "incoming", "active", "deferred", "hold"):
            self.metrics.queue.labels(state).set(counts.get(state, 0))
        self.metrics.oldest.set(0 if oldest is None else max(0.0, time.time() - oldest))

    def status(self) -> str:
        dead = self.dead_destinations()
        return json.dumps({
            "pid": os.getpid(),
            "uptime": round(time.monotonic() - self.started, 3),
            "listeners": [str(a) for a in self.addresses],
            "sessions": len(self.sessions),
            "stress": self.anvil.stress,
            "reloads": self.reloads,
            "configuration": self.config.source,
            "delivery_helper": privileged.state(),
            "dead_destinations": dead["dead"],
            "dead_destinations_total": dead["total"],
        })

    def stop(self) -> None:
        """Begin a graceful stop (idempotent)."""
        self._stop_now.set()
        self._stop.set()

    def retire(self) -> None:
        """Stop accepting and end once every open session has ended by itself, as an
        old Postfix smtpd does after a reload (an smtpd worker of an older
        generation); a ``stop()`` meanwhile drains as usual."""
        self.retiring = True
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """A stop (not a retirement: a retiring worker serves every session it accepted)."""
        return self._stop_now.is_set()

    async def _accept_loop(self, listener: trio.SocketListener, kind: str, sessions: trio.Nursery,
                           scope: trio.CancelScope) -> None:
        """Accept until cancelled: every connection gets its own task (and boundary);
        a failing accept() is logged and retried with back-off, never fatal."""
        deferred = DeferredAccept(listener, self.accept_at_once)
        try:
            with scope:
                async with listener:
                    while True:
                        try:
                            stream = await accept(listener, deferred)
                        except trio.ClosedResourceError:
                            return  # closed under us (a reload removed it): nothing more to accept
                        sessions.start_soon(self._handle, stream, kind)
        finally:
            deferred.close()

    async def _handle(self, stream: DirectStream, kind: str = "smtp") -> None:
        """One connection from accept onward, inside its own boundary: whatever goes
        wrong costs this connection only, and its accounting is always undone."""
        with contained("smtpd session", self.metrics):
            try:
                try:
                    address = str(stream.socket.getpeername()[0])
                except OSError:  # reset before we looked at it: nobody left to talk to
                    log.info("lost connection after CONNECT from unknown[unknown]")
                    return
                await self._session(stream, kind, address)
            finally:
                if stream.socket.fileno() != -1:  # the session closes it; this is for when it never ran
                    with trio.CancelScope(shield=True):
                        await stream.aclose()

    async def _session(self, stream: DirectStream, kind: str, address: str) -> None:
        config = self.config
        context = self.contexts[kind]
        # Counted from the start (smtpd_process_limit, per-client limits, stress), and a
        # connection that is refused gets its 421 at once, without the client-name lookup:
        # a flood whose reverse zones never answer cannot hold descriptors past the limit.
        refused = self.anvil.admit(address, trio.current_time())
        stress = self.anvil.opened(address)
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        session: Session | None = None
        try:
            if stress is not None:  # on, or (other workers' sessions ended) off
                self._stress_changed()
            name = "unknown"
            if refused is None and context.config.smtpd_peername_lookup:  # Postfix: before its greeting
                name = await self.peer_names.name(self.peer_resolver, address)
            decisions = SmtpdSession(context, address, name)
            session = Session(
                stream,
                decisions,
                limits=self.limits,
                error_sleep=config.smtpd_error_sleep_time,
                soft_error_limit=config.smtpd_soft_error_limit,
                session_deadline=config.smtpd_session_deadline,
                implicit_tls=kind == "smtps",
            )
            greeting = None
            if refused == anvil.TOO_MANY:
                log.warning("too many connections from %s", decisions.client)
                greeting = replies.too_many_connections(context.hostname)
            elif refused == anvil.TOO_FAST:
                log.warning("too many connections per minute from %s", decisions.client)
                greeting = replies.Reply(421, "4.7.0", f"{context.hostname} Error: too many connections from {address}")
            self.sessions.add(session)
            if self.anvil.stress:
                session.tighten(self.stress_limits)
            if self.stopping:
                session.request_stop()
            await session.run(greeting)
        finally:
            if session is not None:
                self.sessions.discard(session)
            if self.anvil.closed(address) is False:
                self._stress_changed()
            if not self.sessions:
                self._idle.set()

    def recheck_stress(self) -> None:
        """With workers the session total also moves with other processes' sessions:
        stress may have ended while this one opened and closed nothing."""
        if self.anvil.restate() is not None:
            self._stress_changed()

    def _stress_changed(self) -> None:
        """Stress mode turned on (every open session gets the stress limits now) or off
        (new sessions get the normal ones; open sessions keep what they have)."""
        on = self.anvil.stress
        self.stress_gauge.set(1 if on else 0)
        (log.warning if on else log.info)("stress mode %s: %d of %d sessions", "on" if on else "off",
                                          self.anvil.sessions, self.anvil.process_limit)
        if on:
            for session in self.sessions:
                session.tighten(self.stress_limits)

    async def _drain(self) -> None:
        """After the listeners closed: idle sessions now, busy ones after the grace period
        (retiring: every session runs to its end unless a stop comes first)."""
        if self.retiring:
            async with trio.open_nursery() as waiting:
                async def idle() -> None:
                    await self._idle.wait()
                    waiting.cancel_scope.cancel()

                waiting.start_soon(idle)
                await self._stop_now.wait()
                waiting.cancel_scope.cancel()
            if not self.sessions:
                return
        for session in list(self.sessions):
            session.request_stop()
        with trio.move_on_after(self.config.graceful_timeout):
            await self._idle.wait()
        for session in list(self.sessions):
            session.abort()


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


def raise_descriptor_limit() -> None:
    """Use the hard limit for open files: each SMTP session holds one descriptor."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open files limit from %d to %d: %s", soft, hard, exc)


Endpoint = tuple[trio.SocketListener, str, ListenAddress]


async def open_endpoints(config: Config, queue_directory: Path
                         ) -> tuple[list[Endpoint], trio.SocketListener, list[trio.SocketListener]]:
    """Bind every SMTP listener, the control socket and the metrics endpoint; when
    one cannot be opened, those already open are closed and ListenError raised."""
    opened: list[trio.SocketListener] = []
    try:
        listeners: list[Endpoint] = []
        for kind, parameter in LISTENERS:
            for address in config.get(parameter):
                for listener in await open_listeners([address]):
                    opened.append(listener)
                    listeners.append((listener, kind, address))
        control = await open_control_listener(queue_directory)
        opened.append(control)
        metrics_listeners = await open_listeners(config.metrics_listen)
    except BaseException:
        with trio.CancelScope(shield=True):
            for listener in opened:
                await listener.aclose()
        raise
    return listeners, control, metrics_listeners


def become_mail_owner(config: Config, queue_directory: Path, *, helper: bool = True,
                      handed_over: bool = False) -> tuple[Config, Path]:
    """Started as root: start the root delivery helper (when file or command
    targets are allowed or virtual(8) mailboxes are configured:
    trimail.delivery.local.privileged), then become
    mail_owner (entering the chroot jail first when ``chroot = yes``), unless
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
    with maillog.entering_jail(queue_directory) if config.chroot else contextlib.nullcontext():
        drop_privileges(config.mail_owner, queue_directory, config.chroot, handed_over=handed_over)
    if config.chroot:  # trimail.check warned at start about files the jail hides
        config = config.with_overrides({"queue_directory": "/"})
        queue_directory = Path("/")
    log.info("running as %s%s", config.mail_owner, " in a chroot jail" if config.chroot else "")
    return config, queue_directory


def preflight(config: Config) -> None:
    """What would make the Server fail at start is found before any port is open:
    the TLS certificate is loaded once here (ConfigError: exit 2, one line).  This
    is also the last moment it can be read as root and outside the jail."""
    if config.smtpd_tls_cert_file:
        server_tls_context(config)


async def recover(writer: QueueWriter, queue_directory: Path) -> None:
    """Messages an earlier run left ``active`` go back to ``incoming``; a queue that
    cannot even do that is a QueueError (one fatal line at start)."""
    try:
        recovered = await writer.run(Store.recover_active)
    except QueueError:
        raise
    except Exception as exc:  # noqa: BLE001 - the database opened but cannot be written
        raise QueueError(f"{queue_directory / 'queue.db'}: {describe(exc)}") from None
    if recovered:
        log.info("recovered %d message(s) left active by an earlier run", recovered)


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


async def serve(config: Config, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the MTA until ``Server.stop()``; readiness is reported with the Server.

    Start-up order: the queue lock, the queue database (opened and recovered: a
    queue that cannot be opened ends serve with one line before any port is open),
    the TLS certificate (``preflight``), then the listeners, then mail_owner and
    the jail, then the tasks."""
    async with opened_queue(config) as queue:
        listeners, control, metrics_listeners = await open_endpoints(config, queue.directory)
        config, queue.directory = become_mail_owner(config, queue.directory)
        writer = queue.writer
        server = Server(config, writer, listeners)
        async with trio.open_nursery() as top:
            if "qmgr" not in config.master_service_disable:
                await top.start(server.scheduler.run)
            else:
                log.info("qmgr disabled by master_service_disable: mail stays queued")
            top.start_soon(clean_cache, lambda: server.config)  # the verification cache's expiry

            def started(accepting: trio.Nursery) -> None:
                accepting.start_soon(serve_control, control, server.control_commands(), server.metrics)
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
            top.cancel_scope.cancel()  # deliveries in flight stop; their messages go back below
        returned = await writer.run(Store.recover_active)
        if returned:
            log.info("%d message(s) in delivery returned to the incoming queue", returned)
        stats = writer.stats
        log.info("queue writer: %d commits for %d requests, largest batch %d, %.3f s committing",
                 stats.batches, stats.requests, stats.largest_batch, stats.commit_seconds)
        log.info("terminating on stop request")


class OpenedQueue:
    """The queue as serve holds it: its directory (``/`` once inside the jail: the
    writer's connections read it when they open), the lock and the writer."""

    def __init__(self, directory: Path, lock: QueueLock, busy_timeout: float) -> None:
        self.directory = directory
        self.lock = lock
        self.busy_timeout = busy_timeout
        self.writer: QueueWriter

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
    directory = Path(config.queue_directory)
    prepare_directory(directory)
    lock = QueueLock(directory)
    lock.acquire()
    try:
        for warning in check_warnings(config, handing_over=os.geteuid() == 0 and not config.allow_root):
            log.warning("%s", warning)
        queue = OpenedQueue(directory, lock, config.queue_busy_timeout)
        async with QueueWriter(queue.open_store) as writer:
            queue.writer = writer
            await recover(writer, directory)
            preflight(config)
            yield queue
    finally:
        lock.release()
