"""The per-connection loop: bytes between a trio stream and the sans-IO machine.

Replies are flushed only when the machine needs more input (or the output grows
past ``FLUSH_THRESHOLD``), which batches the replies to pipelined commands
(RFC 2920) without ever holding one back while we wait for the client.  Each read
has its own deadline (``smtpd_timeout``).  This loop is the single catch-all
boundary for a session: an unexpected error is logged, the client gets ``421``
if the connection still works, and the connection is closed.

Stress (Postfix's STRESS_README): ``tighten()`` gives a session the limits of a
service under stress (``SessionLimits`` read with ``stress = yes``): a shorter
``smtpd_timeout``, ``smtpd_hard_error_limit``, ``smtpd_junk_command_limit`` and
TLS handshake deadline, and no greeting pause.  It works on a session that is already running: a read, a
greeting pause or a handshake in progress gets the shorter deadline at once, so
idle connections cannot keep every session slot.  A session busy with its own
decision (a commit, a lookup) keeps its deadline until its next read.

Security notes: every read and write has a deadline, and the whole session has
``smtpd_session_deadline``; reads are at most ``RECEIVE_SIZE`` bytes.

Parameters (through ``SessionLimits``): smtpd_timeout, smtpd_hard_error_limit,
smtpd_junk_command_limit, smtpd_tls_handshake_timeout, smtpd_greet_pause,
smtpd_per_record_deadline (a read that completes no command or content line buys no
time: Postfix's per-record deadline, on under stress).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import trio

from trimail.config import Config
from trimail.net.stream import DirectStream
from trimail.net.tls import close_within
from trimail.receive.hooks import DropConnection
from trimail.receive.session import SmtpdSession
from trimail.smtp import replies
from trimail.smtp.events import NEED_DATA, Closed, Event, Rejected, StartTls
from trimail.smtp.states import State
from trimail.supervise import report

log = logging.getLogger("trimail.smtpd")

RECEIVE_SIZE = 64 * 1024
FLUSH_THRESHOLD = 64 * 1024
_IDLE_STATES = (State.INIT, State.READY)


@dataclasses.dataclass(frozen=True, slots=True)
class SessionLimits:
    """The deadlines and error limits of a session: the ones stress mode changes."""

    timeout: float
    hard_error_limit: int
    junk_command_limit: int
    tls_handshake_timeout: float
    greet_pause: float
    per_record_deadline: bool = False

    @classmethod
    def from_config(cls, config: Config, *, stress: bool = False) -> SessionLimits:
        """The limits of *config*; with *stress*, as if ``stress = yes`` (and no greeting
        pause), made once per configuration (``Config.memo``: they take a copy of it)."""
        if stress:
            return config.memo("SessionLimits.stress",
                               lambda: cls._made(config.with_overrides({"stress": "yes"}), stress=True))
        return cls._made(config, stress=False)

    @classmethod
    def _made(cls, config: Config, *, stress: bool) -> SessionLimits:
        return cls(timeout=config.smtpd_timeout, hard_error_limit=config.smtpd_hard_error_limit,
                   junk_command_limit=config.smtpd_junk_command_limit,
                   tls_handshake_timeout=config.smtpd_tls_handshake_timeout,
                   greet_pause=0.0 if stress else config.smtpd_greet_pause,
                   per_record_deadline=config.smtpd_per_record_deadline)


class Session:
    """One connection.  ``request_stop()`` closes it at the next idle moment;
    ``abort()`` closes it now (after the grace period), both with 421."""

    def __init__(self, stream: trio.abc.Stream, decisions: SmtpdSession, *, limits: SessionLimits,
                 error_sleep: float, soft_error_limit: int, session_deadline: float = math.inf,
                 implicit_tls: bool = False) -> None:
        self.stream: trio.abc.Stream = stream
        self.session_deadline = trio.current_time() + session_deadline
        self.implicit_tls = implicit_tls
        self.decisions = decisions
        self.conn = decisions.connection()
        settings = self.conn.settings
        if (settings.hard_error_limit, settings.junk_command_limit) != (limits.hard_error_limit,
                                                                        limits.junk_command_limit):
            # usually equal (both come from one configuration), and replace() is not cheap
            self.conn.settings = dataclasses.replace(settings, hard_error_limit=limits.hard_error_limit,
                                                     junk_command_limit=limits.junk_command_limit)
        self.timeout = limits.timeout
        self.greet_pause = limits.greet_pause
        self.tls_handshake_timeout = limits.tls_handshake_timeout
        self.per_record_deadline = limits.per_record_deadline
        self.error_sleep = error_sleep
        self.soft_error_limit = soft_error_limit
        self.stopping = False
        self._scope: trio.CancelScope | None = None
        self._reading = False
        self._waiting: trio.CancelScope | None = None  # the greeting pause or TLS handshake in progress
        self._handshake: trio.CancelScope | None = None

    def tighten(self, limits: SessionLimits) -> None:
        """Stress: take the smaller of each limit, effective now for a read, pause or
        handshake in progress (see the module docstring)."""
        self.timeout = min(self.timeout, limits.timeout)
        self.tls_handshake_timeout = min(self.tls_handshake_timeout, limits.tls_handshake_timeout)
        self.greet_pause = min(self.greet_pause, limits.greet_pause)
        self.per_record_deadline = self.per_record_deadline or limits.per_record_deadline
        settings = self.conn.settings
        self.conn.settings = dataclasses.replace(
            settings, hard_error_limit=min(settings.hard_error_limit, limits.hard_error_limit),
            junk_command_limit=min(settings.junk_command_limit, limits.junk_command_limit))
        now = trio.current_time()
        if self._waiting is not None and self._waiting is self._handshake:
            # the handshake's own deadline ends it (logged as a TLS failure, no plaintext 421)
            self._waiting.deadline = min(self._waiting.deadline, now + self.tls_handshake_timeout)
        elif self._waiting is not None:
            self._waiting.deadline = min(self._waiting.deadline, now + self.greet_pause)
        elif self._scope is not None and self._reading:
            self._scope.deadline = min(self._scope.deadline, now + self.timeout)

    def request_stop(self) -> None:
        self.stopping = True
        if self._reading and self.conn.state in _IDLE_STATES and self._scope is not None:
            self._scope.cancel()

    def abort(self) -> None:
        self.stopping = True
        if self._scope is not None:
            self._scope.cancel()

    async def run(self, greeting: replies.Reply | None = None) -> None:
        client = self.decisions.client
        log.info("connect from %s", client)
        try:
            # One scope for the whole session: its deadline is smtpd_timeout from the
            # start of the current read or write; stop requests cancel it too.
            with trio.CancelScope() as self._scope:
                if self.implicit_tls:  # bounded by its own deadline, smtpd_tls_handshake_timeout
                    await self._start_tls()
                    self.conn.tls_active = True
                self._extend_deadline()
                if greeting is None and self.greet_pause > 0 and await self._talks_first():
                    log.info("reject: pipelining before the greeting from %s", client)
                    greeting = replies.Reply(554, "5.5.1", "Error: SMTP protocol synchronization")
                if self.decisions.ctx.hooks is not None:  # trimail.testing: faults at connect
                    greeting = await self.decisions.ctx.hooks.connected(self.decisions, greeting)
                self.conn.greet(greeting)
                await self._loop()
            if self._scope.cancelled_caught:
                hostname = self.decisions.ctx.hostname
                if self.stopping:
                    self.conn.close(replies.shutting_down(hostname), "shutting down")
                elif trio.current_time() >= self.session_deadline:
                    log.info("session time limit exceeded after %s from %s", self.conn.state.value.upper(), client)
                    self.conn.close(replies.Reply(421, "4.4.2", f"{hostname} Error: session time limit exceeded"),
                                    "session deadline")
                else:
                    log.info("timeout after %s from %s", self.conn.state.value.upper(), client)
                    self.conn.close(replies.timeout(hostname), "timeout")
            await self._final_flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            log.info("lost connection after %s from %s", self.conn.state.value.upper(), client)
        except _TlsFailed as exc:
            log.info("SSL_accept error from %s: %s", client, exc)
        except DropConnection:
            log.info("dropped connection after %s from %s (fault injection)", self.conn.state.value.upper(), client)
        except Exception as exc:  # noqa: BLE001 - the session's boundary: one line, traceback at debug, counted
            report(f"session with {client}", exc, logger=log)
            if self.decisions.ctx.metrics is not None:
                self.decisions.ctx.metrics.task_failed("smtpd session")
            if not self.conn.closed:
                self.conn.close(replies.TEMPORARY_FAILURE, "internal error")
            await self._final_flush()
        finally:
            self.decisions.close()  # discards an unfinished transaction
            if self.decisions.ctx.hooks is not None:
                self.decisions.ctx.hooks.ended(self.decisions)
            if isinstance(self.stream, DirectStream):
                self.stream.close_now()  # (no pass of the run loop, nor a scope to shield it)
            else:  # TLS: close_notify is sent, shielded from a stop, within its bound
                await close_within(self.stream)
            log.info("disconnect from %s%s", client, format_stats(self.conn.command_stats))

    async def _loop(self) -> None:
        conn = self.conn
        hostname = self.decisions.ctx.hostname
        hooks = self.decisions.ctx.hooks  # trimail.testing: sees (and may cut) what the client sends
        progress = True  # a whole record (command or content line) since the deadline was last set
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                if self.stopping and conn.state in _IDLE_STATES:
                    conn.close(replies.shutting_down(hostname), "shutting down")
                    continue
                await self._flush()
                if progress or not self.per_record_deadline:
                    # smtpd_per_record_deadline: a read that completed no line buys no time
                    self._extend_deadline()
                progress = False
                self._reading = True
                data = await self.stream.receive_some(RECEIVE_SIZE)
                self._reading = False
                if hooks is not None:
                    hooks.received(self.decisions, data)
                conn.receive_data(data)
                continue
            progress = True
            assert isinstance(event, Event)
            if isinstance(event, Closed):
                return
            reply = await self.decisions.handle(conn, event)
            if event.needs_reply:
                conn.respond(reply)
                if reply is not None and reply.is_error:
                    await self._error_delay()
                elif isinstance(event, StartTls):
                    await self._flush()
                    await self._start_tls()
            elif isinstance(event, Rejected):
                await self._error_delay()
            if conn.output_size > FLUSH_THRESHOLD:
                await self._flush()

    def _extend_deadline(self) -> None:
        """smtpd_timeout from now, for the next read or write, but never past the
        session deadline (a client sending one byte at a time cannot stay forever).
        Moving a trio deadline has a cost, so it moves only when it gained a second."""
        assert self._scope is not None
        deadline = min(trio.current_time() + self.timeout, self.session_deadline)
        if deadline - self._scope.deadline >= 1.0 or self._scope.deadline == math.inf:
            self._scope.deadline = deadline

    async def _start_tls(self) -> None:
        ctx = self.decisions.ctx.tls_context
        assert ctx is not None
        if self.decisions.ctx.hooks is not None:  # trimail.testing: STARTTLS faults
            ctx = self.decisions.ctx.hooks.tls_context(self.decisions, ctx)
        stream = trio.SSLStream(self.stream, ctx, server_side=True, https_compatible=False)
        try:
            with trio.CancelScope(deadline=trio.current_time() + self.tls_handshake_timeout) as scope:
                self._waiting = self._handshake = scope
                await stream.do_handshake()
        except trio.BrokenResourceError as exc:
            raise _TlsFailed(str(exc) or type(exc).__name__) from None
        finally:
            self._waiting = None
        if scope.cancelled_caught:
            raise _TlsFailed("handshake timeout")
        self.stream = stream
        cipher = stream.cipher()
        self.decisions.tls = f"{stream.version()} with cipher {cipher[0]} ({cipher[2]}/{cipher[2]} bits)"
        log.info("Anonymous TLS connection established from %s: %s", self.decisions.client, self.decisions.tls)

    async def _talks_first(self) -> bool:
        """smtpd_greet_pause: does the client send before our banner?"""
        try:
            with trio.move_on_after(self.greet_pause) as self._waiting:
                data = await self.stream.receive_some(RECEIVE_SIZE)
                return bool(data)
        finally:
            self._waiting = None
        return False

    async def _error_delay(self) -> None:
        """Tarpit: past smtpd_soft_error_limit, each error reply is delayed."""
        if self.conn.error_count > self.soft_error_limit and self.error_sleep > 0:
            await self._flush()
            await trio.sleep(self.error_sleep)

    def _output(self) -> bytes:
        """The replies waiting to be sent (trimail.testing's hooks see them first)."""
        data = self.conn.data_to_send()
        if data and self.decisions.ctx.hooks is not None:
            self.decisions.ctx.hooks.sent(self.decisions, data)
        return data

    async def _flush(self) -> None:
        data = self._output()
        if data:
            self._extend_deadline()
            await self.stream.send_all(data)

    async def _final_flush(self) -> None:
        """The last replies (221, 421), shielded from stop requests and bounded by their
        own deadline; on a plain connection the kernel nearly always takes them at once,
        and then no scope is made (a scope costs about as much as a send)."""
        if not self.conn.output_size:
            return
        data: bytes | memoryview = self._output()
        try:
            if isinstance(self.stream, DirectStream):
                sent = self.stream.send_now(data)
                if sent == len(data):
                    return
                data = memoryview(data)[sent:]
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 5):
                await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


class _TlsFailed(Exception):
    pass


def format_stats(stats: dict[str, int]) -> str:
    """Postfix's disconnect summary: ``ehlo=1 mail=1 rcpt=0/1 ... commands=3/4``."""
    parts = []
    total = ok = 0
    for name, count in stats.items():
        if name.endswith("/ok"):
            continue
        good = stats.get(name + "/ok", 0)
        total += count
        ok += good
        parts.append(f"{name}={count}" if good == count else f"{name}={good}/{count}")
    if total:
        parts.append(f"commands={total}" if ok == total else f"commands={ok}/{total}")
    return (" " + " ".join(parts)) if parts else ""
