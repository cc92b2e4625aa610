"""Server: the SMTP services of one process (master.cf's smtp, submission and smtps)
and the parts they share, with the handle serve and an smtpd worker hold.

A Server owns the accept loops (one per listening socket, ``start_listening``),
each connection from accept onward (``_handle``: admission, the client-name
lookup, the session), the stress level, the drain after a stop or retirement
(``_drain``), ``reload`` (new configuration, tables and listeners; sessions in
progress keep theirs) and ``stop``; the control socket's commands and status are
trimail.commands.  Its parts:
one ``ReceiveContext`` per session kind, the queue manager of this process (or,
in an smtpd worker, the trigger that wakes the qmgr worker's), one
address-verification cache, the metrics and anvil's accounting.  master.serve
and trimail.processes.worker start it in their nurseries (master.serve_sessions).

Security: each connection runs inside its own error boundary
(``supervise.contained``) and its accounting is undone in ``finally``; a
connection refused by ``smtpd_process_limit`` or a per-client limit gets its
``421`` at once, before the client-name lookup, so a flood whose reverse zones
never answer cannot hold descriptors past the limit; an accept error is logged
and retried, never fatal (trimail.net.listener).

Parameters: smtpd_listen, submission_listen, smtps_listen, smtpd_timeout,
smtpd_soft_error_limit, smtpd_error_sleep_time, smtpd_client_connection_count_limit,
smtpd_client_connection_rate_limit, smtpd_process_limit, graceful_timeout,
smtpd_stress_threshold, smtpd_junk_command_limit, smtpd_hard_error_limit,
smtpd_tls_handshake_timeout, smtpd_greet_pause, smtpd_session_deadline,
smtpd_peername_lookup, dns_nameservers, dns_concurrency_limit,
master_service_disable, queue_directory and chroot (a reload refuses a new queue_directory), plus
everything trimail.receive reads.
"""

from __future__ import annotations

import functools
import logging
import resource
import time
import weakref
from typing import TYPE_CHECKING, Any

import trio

from trimail import __version__, anvil
from trimail import config as configuration
from trimail.config import Config, ConfigError
from trimail.config.values import ListenAddress
from trimail.delivery.connector import Connector
from trimail.maps import TableError
from trimail.metrics import Metrics
from trimail.net.dns import Resolver
from trimail.net.listener import (
    DeferredAccept,
    ListenError,
    accept,
    bound_address,
    close_now,
    open_listeners,
)
from trimail.net.session import Session, SessionLimits
from trimail.net.stream import DirectStream
from trimail.peername import PeerNames
from trimail.policy.restrictions import restriction_lists
from trimail.policy.verify import Verifier
from trimail.queue.store import Store
from trimail.queue.writer import QueueWriter
from trimail.receive.context import ReceiveContext
from trimail.receive.session import SmtpdSession
from trimail.scheduler import Scheduler
from trimail.scheduler.trigger import QmgrTrigger
from trimail.smtp import replies
from trimail.startup import LISTENERS
from trimail.supervise import contained

if TYPE_CHECKING:
    from trimail.processes.turns import Turns

log = logging.getLogger("trimail.master")


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
                 turns: Turns | None = None) -> None:
        self.config = config
        self.writer = writer
        # one of several smtpd workers: when it takes a pending connection, and when it
        # rests (trimail.processes.turns, net.listener.DeferredAccept)
        self.turns = turns
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
        resolver = self._resolver = Resolver(config.dns_nameservers, concurrency=config.dns_concurrency_limit)
        self.peer_resolver = peer_resolver(config)
        # what the server hands out to read its state holds it weakly (no reference cycle keeps a
        # stopped Server, and all it owns, alive until the garbage collector runs), and reads
        # nothing once it is gone (a test that kept its metrics or scheduler)
        this = weakref.ref(self)
        self._own_addresses = lambda: server.addresses if (server := this()) is not None else []
        self.metrics = Metrics()
        # what new mail is handed to: the queue manager in this process, or (an smtpd worker) the
        # trigger that wakes the qmgr worker's; nothing when qmgr is disabled (master_service_disable)
        self.handing_over: Scheduler | QmgrTrigger | None = trigger
        if trigger is None and "qmgr" not in config.master_service_disable:
            self.handing_over = self.scheduler
        auth_failures = anvil.AuthFailures(shared_clients)  # every worker's, given the client board
        self.contexts = {kind: ReceiveContext(config, writer, scheduler=self.handing_over, resolver=resolver,
                                              kind=kind, auth_failures=auth_failures)
                         for kind in {kind for _, kind, _ in listeners} | {"smtp"}}
        self.context = self.contexts["smtp"]
        # one address-verification cache and probe limit for every listener, kept across reloads
        self.verifier = Verifier(config, resolver)
        for context in self.contexts.values():
            context.policy.verifier, context.metrics = self.verifier, self.metrics
        self.metrics.measure("sessions", lambda: len(server.sessions) if (server := this()) is not None else 0)
        self.metrics.measure("dead", lambda: len(server.dead_now()) if (server := this()) is not None else 0)
        writer.on_commit = self.metrics.commit
        self.sessions: set[Session] = set()
        self.anvil = anvil.Anvil(config, shared_sessions, shared_clients)
        self.peer_names = PeerNames()  # verified client names, cached across sessions (smtpd_peername_lookup)
        self.limits = SessionLimits.from_config(config)
        self.stress_limits = SessionLimits.from_config(config, stress=True)
        self.started = time.monotonic()
        self.reloads = 0
        self.metrics_addresses: list[ListenAddress] = []
        self._stop = trio.Event()
        self._stop_now = trio.Event()
        self.retiring = False
        self._idle = trio.Event()
        self._idle.set()

    @functools.cached_property
    def scheduler(self) -> Scheduler:
        """This process's queue manager, made when first wanted: at start when it runs
        here, else never unless asked (a capturing test MTA, an smtpd worker)."""
        scheduler = Scheduler(self.config, self.writer, Connector(self.config, self._resolver, self._own_addresses))
        scheduler.metrics = self.metrics
        return scheduler

    @property
    def queue_manager(self) -> Scheduler | None:
        """The queue manager if this process has made one (always when qmgr runs here),
        without making one."""
        return self.__dict__.get("scheduler")

    def dead_now(self) -> list[Any]:
        """The destinations held dead now (none when there is no queue manager here)."""
        manager = self.queue_manager
        return manager.dead.snapshot(time.time()) if manager is not None else []

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
            if self.config.chroot and self.config.queue_directory == "/":  # in the jail, as startup left it
                fresh = fresh.with_overrides({"queue_directory": "/"})
            configuration.refuse_restart_only_changes(self.config, fresh)
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
            if self._stop.is_set():  # a SIGHUP during the stop: nothing opened stays (its nursery is closed)
                raise ConfigError("serve is stopping")
            if (manager := self.queue_manager) is not None:  # (one made later takes self.config then)
                manager.reconfigure(fresh)
            self.verifier.reconfigure(fresh, resolver)
        except (ConfigError, TableError, OSError, ListenError) as exc:
            for listener, _, _ in opened:
                await listener.aclose()
            stopping = self._stop.is_set()  # (a SIGHUP during the stop: as the master with workers says it)
            log.log(logging.INFO if stopping else logging.ERROR, "reload ignored: %s" if stopping else
                    "reload refused, keeping the running configuration: %s", exc)
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
        self.metrics.set_queue(*await self.writer.read(Store.gauges))

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
        deferred = DeferredAccept(listener, self.turns, busy=lambda: len(self.sessions) > 1)
        try:
            with scope:
                while True:
                    try:
                        stream = await accept(listener, deferred, self._out_of_descriptors)
                    except trio.ClosedResourceError:
                        return  # closed under us (a reload removed it): nothing more to accept
                    sessions.start_soon(self._handle, stream, kind)
        finally:
            deferred.close()
            close_now(listener)

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
                error_sleep=context.config.smtpd_error_sleep_time,  # per listener (reinject_overrides)
                soft_error_limit=context.config.smtpd_soft_error_limit,
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

    def _out_of_descriptors(self) -> None:
        if self.anvil.out_of_descriptors():
            log.warning("out of file descriptors at %d sessions of this process (RLIMIT_NOFILE %d)",
                        len(self.sessions), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
            self._stress_changed()

    def recheck_stress(self) -> None:
        """With workers the session total also moves with other processes' sessions:
        stress may have ended while this one opened and closed nothing."""
        if self.anvil.restate() is not None:
            self._stress_changed()

    def _stress_changed(self) -> None:
        """Stress mode turned on (every open session gets the stress limits now) or off
        (new sessions get the normal ones; open sessions keep what they have)."""
        on = self.anvil.stress
        self.metrics.stress.set(1 if on else 0)
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
            if not self._stop_now.is_set():
                # idle, and no stop: whatever session started meanwhile (one whose client-name
                # lookup just ended, say) runs to its end too, in the session nursery; it was
                # asked to stop and cut after the grace period when the idle wake-up and its
                # start crossed (a 220 and then nothing: test_redteam18's reload test, in CI)
                return
        if not self.sessions:  # (no checkpoint: a stop with nothing to drain takes no turn of the loop)
            return
        for session in list(self.sessions):
            session.request_stop()
        with trio.move_on_after(self.config.graceful_timeout):
            await self._idle.wait()
        for session in list(self.sessions):
            session.abort()
