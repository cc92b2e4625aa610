"""reject_unverified_recipient: Postfix's address verification (verify(8)) in smtpd.

A recipient is verified by a probe over the route its mail would take (the
router: transport_maps, relayhost, MX): connect, EHLO, ``MAIL
FROM:<address_verify_sender>``, ``RCPT TO:<recipient>``, then RSET and QUIT --
never DATA -- through the delivery SMTP client's Connector (MX order, loop
detection, smtp_tls_security_level as for deliveries).  250/251 is deliverable; a 5xx (to MAIL or RCPT) undeliverable; a
4xx, a connection or DNS failure is "not verified yet".  Recipients routed to
the local, error or discard transports are not probed (local users are
local_recipient_maps' job; an error route is undeliverable with its text).

The address probed (and the cache key) is the resolver's form of the recipient, the
one its mail would be delivered to, not the client's spelling of it.

Answers (Postfix's texts):
  deliverable            -> go on (dunno)
  undeliverable          -> unverified_recipient_reject_code: 5xx ``<a>: Recipient
                            address rejected: undeliverable address: <why>``, 4xx the
                            same as "unverified" below
  unverified, in progress -> unverified_recipient_defer_code ``450 4.1.1 <a>: Recipient
                            address rejected: unverified address: <why>``, as a
                            defer_if_permit (unverified_recipient_tempfail_action)

The cache (trimail/queue/verifycache.py, the file address_verify_map names, by
default ``$queue_directory/verify_cache.db``) is shared by every process of a serve
-- each smtpd worker's Verifier opens it -- and survives reloads, stops and
restarts; every session of one process shares its Verifier whatever its listener
(serve makes one and hands it to the Policy of every listener kind; a reload
reconfigures it and keeps its running probes and its probe limit).  Postfix's
verify(8) rules: a deliverable answer is used for
address_verify_positive_expire_time, an undeliverable one, and a temporary
failure the server gave (a 4xx, no connection or no answer), for
address_verify_negative_expire_time (with address_verify_negative_cache; without
it failures are not kept).  Past address_verify_positive_refresh_time /
address_verify_negative_refresh_time an answer is still used but the address is
probed again in the background, and a failed probe never replaces a deliverable
answer that has not expired (optimistic caching).  So an outsider repeating RCPT
for an address whose probe tempfails (an internal server greylisting, rate
limiting or down) cannot turn each RCPT into a connection to that server.  A
failure of our own (the probe's time limit, which includes waiting for a free
slot; an internal error; a table that cannot be read) is never cached, so a
flood that makes probes wait cannot poison the cache for real users.  The cache
holds at most address_verify_cache_size addresses (the oldest answers go first);
expired entries are removed every address_verify_cache_cleanup_interval by
``clean_cache`` (``policy/verifycleanup.py``), which one process runs (the qmgr
worker, or a single-process serve).

At most one probe runs for an address across all processes: the process that
starts it leaves a mark with a deadline (PROBE_MARK) in the cache; another finds
the mark and does not probe.  smtpd waits for an answer at most
(address_verify_poll_count - 1) x address_verify_poll_delay -- on its own probe
directly, on another process's by looking at the cache every poll delay, as
Postfix's smtpd polls verify(8) -- and then answers "Address verification in
progress"; the probe goes on, so the client's retry finds the answer in the cache.
A cache that cannot be read or written (a file that cannot be created, a corrupt
file, a lock held too long) answers "Address verification status unavailable" as
a temporary failure (unverified_recipient_defer_code), with one warning a minute
in the log; the session and the worker go on.

Security: a probe is one bounded SMTP dialogue (the smtp_*_timeouts, at most
PROBE_TIME_LIMIT in all; reply lines bounded by the SMTP client's parser); the
peer's words reach our reply and the log only through ``classify`` (printable,
bounded).  The probe's connection is closed on every path after connect (an
answer, a peer error, an exception, a cancellation such as the time limit).  At most PROBES_AT_ONCE probes run at a time; more queries wait their
turn within the same poll bound.  Background probes are error boundaries: any
failure becomes "not verified" and one log line.  A probe never sends content.

Parameters: address_verify_sender, address_verify_map,
address_verify_positive_expire_time, address_verify_positive_refresh_time,
address_verify_negative_expire_time, address_verify_negative_cache,
address_verify_negative_refresh_time,
address_verify_poll_count, address_verify_poll_delay, address_verify_cache_size,
queue_busy_timeout,
unverified_recipient_reject_code, unverified_recipient_defer_code,
unverified_recipient_tempfail_action, unverified_recipient_reject_reason,
smtp_*_timeout, relayhost, transport_maps, default_transport, myorigin, smtpd_listen,
table_lookup_timeout.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from trimail import rewrite
from trimail.config import Config
from trimail.delivery.connector import ConnectionFailed, Connector
from trimail.delivery.outcome import classify
from trimail.delivery.route import SMTP_TRANSPORTS, Route, RouteError, Router
from trimail.delivery.smtp import ConnectionLost
from trimail.maps import TableError, off_loop
from trimail.net.dns import Resolver
from trimail.policy.engine import DUNNO, Request, Result, Verdict, register
from trimail.queue.verifycache import Entry, VerifyCache, VerifyCacheError, cache_file
from trimail.smtp.client import mail_command, rcpt_command
from trimail.supervise import describe

if TYPE_CHECKING:
    from trimail.policy.restrictions import Policy

log = logging.getLogger("trimail.verify")
T = TypeVar("T")

PROBE_TIME_LIMIT = 120.0  # seconds for one whole probe, whatever the smtp_*_timeouts say
PROBES_AT_ONCE = 20
# how long a probe's mark in the shared cache stands: a process that died mid-probe
# holds the address no longer than this (Postfix: PROBE_TTL, for probes through its queue)
PROBE_MARK = PROBE_TIME_LIMIT + 30.0
IN_PROGRESS = "Address verification in progress"
UNAVAILABLE = "Address verification status unavailable"  # Postfix's verify(8), for a cache that fails


@dataclasses.dataclass(frozen=True, slots=True)
class Answer:
    status: str  # "ok", "bounce" or "defer"
    why: str = ""
    local: bool = False  # a failure here (time limit, error, table), not the server's word: never cached


class _Probe:
    """One running probe: the queries that share it wait for *done*."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.answer: Answer | None = None


def _probe_route(config: Config, resolver: Resolver) -> tuple[Router, Connector]:
    """What a probe routes and connects with (the Router first: a broken table raises)."""
    return Router(config), Connector(config, resolver, list(config.smtpd_listen))


class Verifier:
    """Probes and the shared cache; one per serve process (shared by its sessions)."""

    def __init__(self, config: Config, resolver: Resolver) -> None:
        self.running: dict[str, _Probe] = {}  # probes this process runs
        self.limiter = trio.CapacityLimiter(PROBES_AT_ONCE)
        self.probes = 0  # started, for the log and tests
        self.store: VerifyCache | None = None
        self.store_turn = trio.CapacityLimiter(1)  # one connection: one call at a time, in a thread
        self._complained: tuple[str, float] = ("", 0.0)
        self._route: tuple[Router, Connector] | None = None
        self.reconfigure(config, resolver)

    @property
    def router(self) -> Router:
        return self._probe_route()[0]

    @property
    def connector(self) -> Connector:
        return self._probe_route()[1]

    def _probe_route(self) -> tuple[Router, Connector]:
        if self._route is None:
            self._route = _probe_route(self.config, self.resolver)
        return self._route

    def reconfigure(self, config: Config, resolver: Resolver) -> None:
        """Take a reloaded configuration: new probes use its route, timeouts and
        expiry times; the cache (unless address_verify_map names another), the
        running probes and the probe limit stay."""
        path = cache_file(config.address_verify_map)  # first: whatever raises leaves the running configuration
        # the route and connector of probes, made at the first probe (most servers never
        # verify an address), or now when probes already ran (a reload: a broken table shows)
        route = _probe_route(config, resolver) if self._route else None
        self.config, self.resolver, self._route = config, resolver, route
        sender = config.address_verify_sender.strip().strip("<>")
        self.sender = sender if not sender or "@" in sender else f"{sender}@{config.myorigin}"
        self.positive: float = config.address_verify_positive_expire_time
        self.positive_refresh: float = config.address_verify_positive_refresh_time
        self.negative: float = config.address_verify_negative_expire_time
        self.negative_refresh: float = config.address_verify_negative_refresh_time
        self.negative_cache: bool = config.address_verify_negative_cache
        self.poll_delay: float = config.address_verify_poll_delay
        self.wait: float = max(config.address_verify_poll_count - 1, 0) * self.poll_delay
        self.size: int = max(config.address_verify_cache_size, 1)
        if self.store is None or self.store.path != path:
            self.store = VerifyCache(path, busy_timeout=config.queue_busy_timeout)  # the old one closes unused

    async def _db(self, method: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A VerifyCache call in a thread: SQLite may wait for another process's lock."""
        async with self.store_turn:
            return await trio.to_thread.run_sync(lambda: method(*args, **kwargs))

    def _unavailable(self, exc: VerifyCacheError) -> None:
        """One warning per kind of failure a minute (a client repeating RCPT must not flood the log)."""
        text, last = self._complained
        now = time.monotonic()
        if str(exc) != text or now - last >= 60:
            log.warning("address verification cache unavailable: %s", exc)
            self._complained = (str(exc), now)

    def usable(self, entry: Entry | None, now: float) -> Answer | None:
        """The answer an entry gives now: None when there is none, or it expired."""
        if entry is None or entry.status is None:
            return None
        if entry.status == "ok":
            return Answer("ok", entry.text) if entry.updated + self.positive >= now else None
        if not self.negative_cache or entry.updated + self.negative < now:
            return None
        return Answer(entry.status, entry.text)

    def _stale(self, entry: Entry | None, answer: Answer | None, now: float) -> bool:
        """No answer, or one past its refresh time (still used, probed again)."""
        if entry is None or answer is None:
            return True
        refresh = self.positive_refresh if answer.status == "ok" else self.negative_refresh
        return entry.updated + refresh < now

    async def cached(self, address: str) -> Answer | None:
        """What the cache says of *address* now (tests and tools)."""
        return self.usable(await self._db(self.store.lookup, address.lower()), time.time())

    async def query(self, address: str, key: str | None = None) -> Answer:
        """The verification status of *address* (cached under *key*, default the
        address): cached (a stale answer is used while a probe refreshes it), or
        from a probe that ends within the poll bound, else "defer" (in progress,
        the probe goes on).  A probe running in another process is not repeated:
        the cache is looked at again every address_verify_poll_delay, as Postfix's
        smtpd polls verify(8)."""
        key = (key or address).lower()
        deadline = trio.current_time() + self.wait
        while True:
            now = time.time()
            try:
                entry = await self._db(self.store.lookup, key)
            except VerifyCacheError as exc:
                self._unavailable(exc)
                return Answer("defer", UNAVAILABLE, local=True)
            answer = self.usable(entry, now)
            if self._stale(entry, answer, now) and key not in self.running \
                    and (entry is None or entry.probing_until < now):
                try:  # one probe for all processes: whoever sets the mark probes
                    mine = await self._db(self.store.claim, key, entry.updated if entry else 0.0, now,
                                          now + PROBE_MARK)
                except VerifyCacheError as exc:
                    self._unavailable(exc)
                    return answer or Answer("defer", UNAVAILABLE, local=True)
                if mine:
                    self.running[key] = _Probe()
                    trio.lowlevel.spawn_system_task(self._probe_task, key, address, self.running[key],
                                                    name=f"trimail address verification of {address}")
            if answer is not None:
                return answer
            probe = self.running.get(key)
            if probe is not None:  # ours: its answer as soon as it comes (not cached if it is our own failure)
                with trio.move_on_at(deadline):
                    await probe.done.wait()
                return probe.answer or Answer("defer", IN_PROGRESS)
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                return Answer("defer", IN_PROGRESS)
            await trio.sleep(min(self.poll_delay, remaining))  # another process probes: look again

    async def _probe_task(self, key: str, address: str, probe: _Probe) -> None:
        """A system task, outside any session: the boundary that turns every failure
        into "not verified" (a probe must never end serve)."""
        answer = Answer("defer", "address verification failed", local=True)
        try:
            with trio.fail_after(PROBE_TIME_LIMIT):
                async with self.limiter:
                    answer = await self.probe(address)
        except trio.TooSlowError:
            answer = Answer("defer", f"address verification timed out after {PROBE_TIME_LIMIT:.0f}s", local=True)
        except Exception as exc:  # noqa: BLE001 (the boundary)
            log.warning("address verification of %s failed: %s", address, describe(exc))
        finally:
            try:
                await self._remember(key, answer)
            finally:
                probe.answer = answer
                del self.running[key]
                probe.done.set()

    async def _remember(self, key: str, answer: Answer) -> None:
        log.info("address verification: <%s> status=%s: %s", key, answer.status, answer.why)
        try:
            if answer.local:  # our own trouble is never cached
                await self._db(self.store.release, key)
            else:
                now = time.time()
                await self._db(self.store.record, key, answer.status, answer.why, now,
                               keep_ok_until=now - self.positive, keep_failures=self.negative_cache,
                               size=self.size)
        except VerifyCacheError as exc:
            self._unavailable(exc)

    async def probe(self, address: str) -> Answer:
        self.probes += 1
        try:
            router = self.router  # (made at the first probe: a broken table is this probe's deferral)
            route: Route = await off_loop(router.tables, router.route, address,
                                          timeout=self.config.table_lookup_timeout)
        except (TableError, RouteError) as exc:
            return Answer("defer", f"mail transport unavailable: {exc}", local=True)
        if route.transport == "error":
            text = route.nexthop or "mail delivery is not allowed"
            return Answer("bounce" if not text.startswith("4") else "defer", text)
        if route.transport not in SMTP_TRANSPORTS:
            return Answer("ok", f"delivered via {route.transport}")
        try:
            conn = await self.connector.open(route)
        except ConnectionFailed as exc:
            status = "bounce" if exc.outcome.status == "bounced" else "defer"
            return Answer(status, exc.outcome.text)
        relay = f"{conn.host}[{conn.address}]"
        try:  # whatever happens after connect (a reply, an error, a cancellation), the connection is closed
            try:
                t = conn.timeouts
                mail = mail_command(self.sender, 0, conn.ext, eight_bit=False, smtputf8=False)
                reply = await conn.command(mail, t.mail, "MAIL FROM")
                stage = "MAIL FROM"
                if reply.code == 250:
                    reply = await conn.command(rcpt_command(address), t.rcpt, "RCPT TO")
                    stage = "RCPT TO"
                with trio.move_on_after(5):
                    await conn.command(b"RSET\r\n", t.mail, "RSET")
            except ConnectionLost as exc:
                conn.usable = False
                return Answer("defer", f"conversation with {relay} failed: {exc.text}")
            except BaseException:
                conn.usable = False  # mid-dialogue: no QUIT, just close
                raise
        finally:
            await conn.close()  # its stream.aclose() is shielded: it runs under cancellation too
        if reply.code in (250, 251):
            return Answer("ok", f"host {relay} said: {reply.code} {' '.join(reply.lines())}")
        outcome = classify(reply, relay, stage)
        return Answer("bounce" if outcome.status == "bounced" else "defer", outcome.text)


@register("reject_unverified_recipient", needs="recipient")
async def reject_unverified_recipient(policy: Policy, req: Request, kind: str, arg: str | None,
                                      verdict: Verdict) -> Result:
    if not req.recipient:
        return DUNNO
    if policy.verifier is None:  # a Policy outside serve (serve hands every Policy its one Verifier)
        policy.verifier = Verifier(policy.config, policy.resolver)
    # one probe and one cache entry per mailbox however the client spells it (the
    # resolver's form is the key), for the address its mail would go to (as Postfix's
    # probe, canonicalised by cleanup)
    resolved = rewrite.resolve(req.recipient, policy.rewrite)
    mailbox = req.recipient if resolved.klass == "invalid" else resolved.address
    answer = await policy.verifier.query(mailbox, key=mailbox)
    config = policy.config
    if answer.status == "ok":
        return DUNNO
    code = config.unverified_recipient_reject_code if answer.status == "bounce" \
        else config.unverified_recipient_defer_code
    why = config.unverified_recipient_reject_reason or answer.why
    if code >= 500:
        return policy.reply(code, "5.1.1", kind, req, f"undeliverable address: {why}")
    reply = policy.reply(code, "4.1.1", kind, req, f"unverified address: {why[:250]}")
    if config.unverified_recipient_tempfail_action == "defer_if_permit":
        return policy.defer_if_permit(verdict, reply)
    return reply
