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

The cache is in memory, shared by every session of one serve process whatever its
listener (serve makes one Verifier and hands it to the Policy of every listener kind;
a reload reconfigures it and keeps its cache, its running probes and its probe
limit), and bounded
(address_verify_cache_size, oldest first out): deliverable answers for
address_verify_positive_expire_time, undeliverable ones for
address_verify_negative_expire_time when address_verify_negative_cache is on, and
so are temporary failures (a probe that got a 4xx, no connection or no answer), for
address_verify_negative_refresh_time: Postfix's verify(8) stores them too and probes
such an address again only at its refresh time, so an outsider repeating RCPT for an
address whose probe tempfails (an internal server greylisting, rate limiting or
down) cannot turn each RCPT into a connection to that server.  A probe still
running ("in progress") and a failure of our own (the probe's time limit, which
includes waiting for a free slot; an internal error; a table that cannot be read)
are never cached, so a flood that makes probes wait cannot poison the cache for
real users.  Concurrent queries for one address
share one probe.  smtpd waits for a probe at most
(address_verify_poll_count - 1) x address_verify_poll_delay; after that it answers
"Address verification in progress" and the probe goes on in the background, so
the client's retry finds the answer in the cache (Postfix's behaviour).

Security: a probe is one bounded SMTP dialogue (the smtp_*_timeouts, at most
PROBE_TIME_LIMIT in all; reply lines bounded by the SMTP client's parser); the
peer's words reach our reply and the log only through ``classify`` (printable,
bounded).  The probe's connection is closed on every path after connect (an
answer, a peer error, an exception, a cancellation such as the time limit).  At most PROBES_AT_ONCE probes run at a time; more queries wait their
turn within the same poll bound.  Background probes are error boundaries: any
failure becomes "not verified" and one log line.  A probe never sends content.

Parameters: address_verify_sender, address_verify_positive_expire_time,
address_verify_negative_expire_time, address_verify_negative_cache,
address_verify_negative_refresh_time,
address_verify_poll_count, address_verify_poll_delay, address_verify_cache_size,
unverified_recipient_reject_code, unverified_recipient_defer_code,
unverified_recipient_tempfail_action, unverified_recipient_reject_reason,
smtp_*_timeout, relayhost, transport_maps, default_transport, myorigin, smtpd_listen,
table_lookup_timeout.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from typing import TYPE_CHECKING

import trio

from trimail import rewrite
from trimail.config import Config
from trimail.delivery.dns import Resolver
from trimail.delivery.route import SMTP_TRANSPORTS, Route, RouteError, Router
from trimail.delivery.smtp import ConnectionFailed, ConnectionLost, Connector
from trimail.maps import TableError, off_loop
from trimail.policy.registry import DUNNO, Request, Result, Verdict, register
from trimail.smtp.client import classify, mail_command, rcpt_command
from trimail.supervise import describe

if TYPE_CHECKING:
    from trimail.policy.restrictions import Policy

log = logging.getLogger("trimail.verify")

PROBE_TIME_LIMIT = 120.0  # seconds for one whole probe, whatever the smtp_*_timeouts say
PROBES_AT_ONCE = 20
IN_PROGRESS = "Address verification in progress"


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


class Verifier:
    """Probes and their cache; one per serve (shared by its sessions)."""

    def __init__(self, config: Config, resolver: Resolver) -> None:
        self.cache: collections.OrderedDict[str, tuple[Answer, float]] = collections.OrderedDict()
        self.running: dict[str, _Probe] = {}
        self.limiter = trio.CapacityLimiter(PROBES_AT_ONCE)
        self.probes = 0  # started, for the log and tests
        self.reconfigure(config, resolver)

    def reconfigure(self, config: Config, resolver: Resolver) -> None:
        """Take a reloaded configuration: new probes use its route, timeouts and
        expiry times; the cache, the running probes and the probe limit stay (an
        answer is as good as it was before the reload; a cache made smaller loses
        its oldest entries)."""
        router = Router(config)  # first: whatever raises leaves the running configuration
        connector = Connector(config, resolver, list(config.smtpd_listen))
        self.config, self.router, self.connector = config, router, connector
        sender = config.address_verify_sender.strip().strip("<>")
        self.sender = sender if not sender or "@" in sender else f"{sender}@{config.myorigin}"
        self.positive: float = config.address_verify_positive_expire_time
        self.negative: float = config.address_verify_negative_expire_time
        self.negative_cache: bool = config.address_verify_negative_cache
        self.tempfail: float = config.address_verify_negative_refresh_time
        self.wait: float = max(config.address_verify_poll_count - 1, 0) * config.address_verify_poll_delay
        self.size: int = max(config.address_verify_cache_size, 1)
        while len(self.cache) > self.size:
            self.cache.popitem(last=False)

    def cached(self, address: str) -> Answer | None:
        entry = self.cache.get(address)
        if entry is None:
            return None
        if entry[1] < time.time():
            del self.cache[address]
            return None
        return entry[0]

    async def query(self, address: str, key: str | None = None) -> Answer:
        """The verification status of *address* (cached under *key*, default the
        address): cached, or from a probe that ends within the poll bound, else
        "defer" (in progress, the probe goes on)."""
        key = (key or address).lower()
        if (answer := self.cached(key)) is not None:
            return answer
        probe = self.running.get(key)
        if probe is None:  # the first query starts the probe; the others share it
            probe = self.running[key] = _Probe()
            trio.lowlevel.spawn_system_task(self._probe_task, key, address, probe,
                                            name=f"trimail address verification of {address}")
        with trio.move_on_after(self.wait):
            await probe.done.wait()
        return probe.answer or Answer("defer", IN_PROGRESS)

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
            self._remember(key, answer)
            probe.answer = answer
            del self.running[key]
            probe.done.set()

    def _remember(self, key: str, answer: Answer) -> None:
        log.info("address verification: <%s> status=%s: %s", key, answer.status, answer.why)
        lifetime = {"ok": self.positive, "bounce": self.negative if self.negative_cache else 0,
                    "defer": self.tempfail if self.negative_cache else 0}.get(answer.status, 0)
        if lifetime <= 0 or answer.local:
            self.cache.pop(key, None)
            return
        self.cache[key] = (answer, time.time() + lifetime)
        self.cache.move_to_end(key)
        while len(self.cache) > self.size:
            self.cache.popitem(last=False)

    async def probe(self, address: str) -> Answer:
        self.probes += 1
        try:
            route: Route = await off_loop(self.router.tables, self.router.route, address,
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
