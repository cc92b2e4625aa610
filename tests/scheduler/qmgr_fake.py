"""A queue manager of plain objects for the destination workers (``destination.Qmgr``),
with a fake connector whose sites are scripted, for MockClock tests: no sockets,
no queue database.  ``FakeQmgr.completed`` records each job's outcomes."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

import trio

from trimail.cleanup.rewrite import LOCAL, REMOTE, header_rewriter
from trimail.config import Config
from trimail.delivery.connector import ConnectionFailed
from trimail.delivery.outcome import Outcome, deferred, sent
from trimail.delivery.route import Route
from trimail.delivery.smtp import Envelope
from trimail.queue.transitions import ClaimedMessage, QueuedRecipient
from trimail.scheduler.dead import DeadSites
from trimail.scheduler.destination import Destination, Job
from trimail.scheduler.slots import AgentSlots
from trimail.scheduler.workers import start_workers

REFUSED = deferred("4.7.0", "host peer[127.0.70.9]:25 refused to talk to me: 421 4.7.0 Too many connections")


class FakeConnection:
    def __init__(self, site: FakeSite) -> None:
        self.site = site
        self.usable = True
        self.address = "127.0.70.9"
        self.relay = "peer[127.0.70.9]:25"

    async def deliver(self, envelope: Envelope, content: Callable[[], AsyncIterator[bytes]]) -> list[Outcome]:
        await trio.sleep(self.site.delivery_time)
        self.site.delivered += envelope.recipients
        self.site.last_delivery = trio.current_time()
        return [sent("250 2.0.0 Ok")] * len(envelope.recipients)

    def desynchronized(self) -> bool:
        return False  # (a well-behaved server says nothing out of turn)

    async def close(self) -> None:
        self.site.open -= 1


class FakeSite:
    """Allows *max_sessions* connections at once (more: 421), or none when dead."""

    def __init__(self, max_sessions: int, *, connect_time: float = 0.1, delivery_time: float = 1.0,
                 failure: Outcome = REFUSED) -> None:
        self.max_sessions = max_sessions
        self.connect_time = connect_time
        self.delivery_time = delivery_time
        self.failure = failure
        self.open = 0
        self.most_open = 0
        self.attempts = 0
        self.refused = 0
        self.delivered: list[str] = []
        self.last_delivery = 0.0  # trio.current_time() of the last delivery

    async def open_connection(self, route: Route) -> FakeConnection:
        self.attempts += 1
        await trio.sleep(self.connect_time)
        if self.open >= self.max_sessions:
            self.refused += 1
            raise ConnectionFailed(self.failure)
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        return FakeConnection(self)


class FakeConnector:
    session_limit = 1  # one host: no backup sessions

    def __init__(self, site: FakeSite) -> None:
        self.site = site
        self.silent: set[str] = set()  # nexthops whose DNS lookups never answer
        self.looking_up = 0  # lookups in progress

    async def lookup(self, route: Route, *, skip: frozenset[str] = frozenset()) -> None:
        self.looking_up += 1
        try:
            if route.nexthop in self.silent:
                await trio.sleep_forever()
            await trio.lowlevel.checkpoint()  # (no DNS: the site is its own address)
        finally:
            self.looking_up -= 1

    async def open(self, route: Route, *, skip: frozenset[str] = frozenset(), targets: None = None) -> FakeConnection:
        """As ``Connector.open``: without *targets* from ``lookup``, it looks up first."""
        if targets is None:
            await self.lookup(route)
        return await self.site.open_connection(route)


class FakeQmgr:
    def __init__(self, config: Config, site: FakeSite) -> None:
        self.config = config
        self.connector = FakeConnector(site)
        self.writer = None
        self.local = self.virtual = None
        self.metrics = None
        self.destinations: dict[tuple, Destination] = {}
        self.dead = DeadSites()
        self.agents = AgentSlots(100)
        self.masq_domains: list[str] = []
        self.masq_exceptions: list[str] = []
        self.masq_classes: list[str] = []
        self.header_rewriters = {(context, mapped): header_rewriter(config, context)
                                 for context in (LOCAL, REMOTE, None) for mapped in (True, False)}
        self.completed: list[tuple[str, Outcome]] = []  # (recipient, outcome) in completion order
        self.nursery: trio.Nursery | None = None

    def wake(self) -> None:
        pass

    async def complete(self, job: Job, outcomes: list[Outcome], relay: str, started: float) -> None:
        await trio.lowlevel.checkpoint()
        self.completed += [(r.address, o) for r, o in zip(job.recipients, outcomes, strict=True)]

    def job_failed(self, job: Job, exc: Exception) -> list[Outcome]:
        return [deferred("4.3.0", f"internal error: {exc}")] * len(job.recipients)

    def enqueue(self, route: Route, address: str) -> None:
        """As qmgr._enqueue: dead destinations refuse at once, the others get the job."""
        assert self.nursery is not None
        message = ClaimedMessage(address, "a@client.example", time.time(), time.time(), 100, {},
                                 [QueuedRecipient(0, address, 0, None)], b"Subject: x\r\n\r\nx\r\n")
        job = Job(message, message.recipients, route, route.key)
        refusal = self.dead.refusal(route.key, time.time())
        if refusal is not None:
            self.completed.append((address, refusal))
            return
        dest = self.destinations.get(route.key)
        if dest is None:
            dest = self.destinations[route.key] = Destination(route, 20, route.key)
        dest.add(job)
        start_workers(self, dest, self.nursery)  # type: ignore[arg-type]
