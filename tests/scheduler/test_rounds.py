"""The queue manager's rounds under trio's MockClock (autojump): the real
Scheduler with a writer and a connector written for the test (no threads, no
sockets), so claims, wake-ups and due times are deterministic and take no real
time."""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import trio

from tests.conftest import wait_for, write_main_cf
from tests.scheduler.storm import queue_due_retries, queue_messages
from trimail import config as configuration
from trimail.delivery.outcome import Outcome, sent
from trimail.delivery.route import Route
from trimail.queue import transitions
from trimail.queue.store import Store
from trimail.scheduler.qmgr import Scheduler, schedule_round
from trimail.scheduler.share import Shares


class InlineWriter:
    """QueueWriter's interface on the test's own thread: each request runs at once
    in its own transaction; ``calls`` counts them by function, ``claims`` keeps the
    size of each round's claim."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.calls: Counter[str] = Counter()
        self.claims: list[int] = []
        self.parked: list[tuple[str, float]] = []

    async def run(self, fn: Callable[..., Any], *args: Any, durable: bool = True) -> Any:
        await trio.lowlevel.checkpoint()
        self.calls[fn.__name__] += 1
        with self.store.transaction():
            result = fn(self.store, *args)
        if fn is schedule_round:
            self.claims.append(len(result[0]))
        if fn is transitions.park:
            self.parked += args[0]
        return result

    async def read(self, fn: Callable[..., Any], *args: Any) -> Any:
        await trio.lowlevel.checkpoint()
        with self.store.read_snapshot():
            return fn(self.store, *args)


class Peer:
    """The connector: every destination answers at once, or holds each delivery
    until the test releases it (``hold``)."""

    session_limit = 0  # smtp_mx_session_limit (delivery.attempt reads it)

    def __init__(self, hold: bool = False) -> None:
        self.hold = hold
        self.released = trio.Semaphore(0)
        self.delivered: list[tuple[float, str]] = []  # (trio time, recipient)
        self.in_delivery = 0
        self.changed = trio.Event()  # set (and replaced) at each delivery

    async def until(self, predicate: Callable[[], object], timeout: float) -> None:
        """Wait for *predicate* to hold after a delivery (no polling under MockClock)."""
        with trio.fail_after(timeout):
            while not predicate():
                await self.changed.wait()

    async def lookup(self, route: Route) -> None:
        await trio.lowlevel.checkpoint()

    async def open(self, route: Route, targets: None = None) -> Connection:
        await trio.lowlevel.checkpoint()
        return Connection(self, route)

    def reconfigure(self, config: object) -> None:
        pass


class Connection:
    def __init__(self, peer: Peer, route: Route) -> None:
        self.peer, self.usable, self.relay = peer, True, f"{route.nexthop}[192.0.2.1]:25"
        self.address = "192.0.2.1"  # (delivery.attempt keeps the addresses an attempt used)

    async def deliver(self, envelope: Any, content: Any) -> list[Outcome]:
        self.peer.in_delivery += 1
        try:
            if self.peer.hold:
                await self.peer.released.acquire()
            async for _ in content():
                pass
        finally:
            self.peer.in_delivery -= 1
        self.peer.delivered += [(trio.current_time(), r) for r in envelope.recipients]
        self.peer.changed.set()
        self.peer.changed = trio.Event()
        return [sent("250 2.0.0 Ok")] * len(envelope.recipients)

    def desynchronized(self) -> bool:
        return False  # (a well-behaved server says nothing out of turn)

    async def close(self) -> None:
        await trio.lowlevel.checkpoint()


async def start(nursery: trio.Nursery, tmp_path, peer: Peer, **params: object) -> tuple[Scheduler, InlineWriter]:
    config = configuration.load(write_main_cf(tmp_path, relayhost="[192.0.2.1]:25", **params))
    writer = InlineWriter(Store.open(tmp_path / "queue"))
    scheduler = Scheduler(config, writer, peer)  # type: ignore[arg-type]
    base, began = time.time(), trio.current_time()
    scheduler.wall_clock = lambda: base + trio.current_time() - began  # due times follow the MockClock
    await nursery.start(scheduler.run)
    return scheduler, writer


async def test_a_storm_is_claimed_in_small_requests_until_the_active_queue_is_full(tmp_path, nursery,
                                                                                   autojump_clock):
    queue_due_retries(tmp_path / "queue", 1000)
    peer = Peer(hold=True)
    scheduler, writer = await start(nursery, tmp_path, peer, qmgr_message_active_limit=600,
                                    qmgr_destination_active_share=100)
    await wait_for(lambda: len(scheduler.active) == 600)
    await trio.testing.wait_all_tasks_blocked()
    assert max(writer.claims) <= transitions.CLAIM_BATCH
    assert sum(writer.claims) == 600 and len([c for c in writer.claims if c]) >= 3
    rounds = writer.calls["schedule_round"]
    peer.released.release()  # one delivery ends: one slot frees, one more message is claimed
    await wait_for(lambda: len(peer.delivered) == 1)
    await wait_for(lambda: sum(writer.claims) == 601)
    assert len(scheduler.active) == 600
    assert writer.calls["schedule_round"] - rounds <= 2  # a wake-up, not polling


async def test_qmgr_message_recipient_limit_bounds_the_recipients_claimed(tmp_path, nursery, autojump_clock):
    queue_messages(tmp_path / "queue", [f"u{i}@far.example" for i in range(100)])
    peer = Peer(hold=True)
    scheduler, _ = await start(nursery, tmp_path, peer, qmgr_message_recipient_limit=30)
    await wait_for(lambda: len(scheduler.active) == 30)
    await trio.testing.wait_all_tasks_blocked()
    assert len(scheduler.active) == 30
    assert not scheduler.reserve()  # new mail waits in incoming too


class FinishingWriter(InlineWriter):
    """Lets ``during[n]`` held deliveries end, and their messages finish, inside the
    n-th round's claim (before it runs), as deliveries end while a writer request
    waits for its turn."""

    def __init__(self, store: Store, peer: Peer, during: dict[int, int]) -> None:
        super().__init__(store)
        self.peer, self.during = peer, during

    async def run(self, fn: Callable[..., Any], *args: Any, durable: bool = True) -> Any:
        if fn is schedule_round and (count := self.during.pop(self.calls["schedule_round"] + 1, 0)):
            ended = len(self.peer.delivered) + count
            for _ in range(count):
                self.peer.released.release()
            await self.peer.until(lambda: len(self.peer.delivered) >= ended, timeout=10)
            await trio.testing.wait_all_tasks_blocked()  # their messages finished (removed)
        return await super().run(fn, *args, durable=durable)


async def test_messages_finishing_during_claims_capped_by_the_recipient_limit_leave_none_waiting(
        tmp_path, nursery, autojump_clock):
    """qmgr_message_recipient_limit of 30: a round's claim is capped at the recipients
    the active queue had room for when it began.  Messages that finish meanwhile
    make room it does not see; when they finish while the last round looked not
    starved they wake nobody, and the mail left in incoming waited for new mail or
    a restart (red team 40: 1-14 of 60 messages for over 300 s after a burst)."""
    queue_messages(tmp_path / "queue", [f"u{i}@far.example" for i in range(100)])
    peer = Peer(hold=True)
    config = configuration.load(write_main_cf(tmp_path, relayhost="[192.0.2.1]:25", qmgr_message_recipient_limit=30))
    writer = FinishingWriter(Store.open(tmp_path / "queue"), peer, {2: 2, 3: 2})
    scheduler = Scheduler(config, writer, peer)  # type: ignore[arg-type]
    await nursery.start(scheduler.run)
    await wait_for(lambda: writer.calls["schedule_round"] >= 1 and len(scheduler.active) == 30)
    peer.released.release()  # the first to finish wakes the round (starved), whose claim sees two more
    # finish; those wake the next round, whose claim sees two more finish (waking nobody)
    await wait_for(lambda: not writer.during and len(peer.delivered) == 5)
    await wait_for(lambda: len(scheduler.active) == 30)  # the room they made is taken at once (it stayed 28)
    for _ in range(100):
        peer.released.release()
    await peer.until(lambda: len(peer.delivered) == 100, timeout=600)


async def test_the_round_sleeps_until_the_next_retry_is_due(tmp_path, nursery, autojump_clock):
    base = time.time()
    queue_due_retries(tmp_path / "queue", 1, now=base)
    store = Store.open(tmp_path / "queue")
    with store.transaction():
        store.db.execute("UPDATE message SET next_attempt = ?", (base + 300,))
    peer = Peer()
    config = configuration.load(write_main_cf(tmp_path, relayhost="[192.0.2.1]:25"))
    writer = InlineWriter(store)
    scheduler = Scheduler(config, writer, peer)  # type: ignore[arg-type]
    began = trio.current_time()
    scheduler.wall_clock = lambda: base + trio.current_time() - began
    await nursery.start(scheduler.run)
    await peer.until(lambda: peer.delivered, timeout=400)
    assert 300 <= peer.delivered[0][0] - began < 301
    assert writer.calls["schedule_round"] <= 3  # one round at start, one when due: no polling


async def test_new_mail_and_retries_are_claimed_and_delivered_in_turn(tmp_path, nursery, autojump_clock):
    queue_due_retries(tmp_path / "queue", 50)
    queue_messages(tmp_path / "queue", [f"n{i}@far.example" for i in range(5)], prefix="N")
    peer = Peer()
    await start(nursery, tmp_path, peer, relay_destination_concurrency_limit=1,
                default_destination_concurrency_limit=1)
    await wait_for(lambda: len(peer.delivered) == 55)
    order = [address[0] for _, address in peer.delivered]
    assert order[:10] == ["n", "r"] * 5


async def test_a_congested_destination_parks_its_messages_paced_at_its_delivery_rate(tmp_path, nursery,
                                                                                     autojump_clock):
    """A destination that takes one job per second, five at a time, with 40
    messages and a share of 10 (25% of 40): 10 active, 30 parked, returning about
    one per delivery interval once half the share has drained, and all delivered."""
    queue_messages(tmp_path / "queue", [f"u{i}@far.example" for i in range(40)])
    peer = Peer(hold=True)
    scheduler, writer = await start(nursery, tmp_path, peer, qmgr_message_active_limit=40,
                                    qmgr_destination_active_share=25, default_destination_concurrency_limit=5,
                                    relay_destination_concurrency_limit=5)
    await wait_for(lambda: len(writer.parked) >= 30)
    await trio.testing.wait_all_tasks_blocked()
    assert len(scheduler.active) == 10  # its share
    assert peer.in_delivery == 5
    began = trio.current_time()
    returns = sorted(until for _, until in writer.parked[:30])
    assert all(later > earlier for earlier, later in itertools.pairwise(returns))  # spread out

    async def one_per_second() -> None:
        while len(peer.delivered) < 40:
            await trio.sleep(1)  # the peer's pace (MockClock time), not synchronisation
            peer.released.release()

    nursery.start_soon(one_per_second)
    await wait_for(lambda: len(peer.delivered) == 40, timeout=1000)
    took = trio.current_time() - began
    print(f"\n40 messages at one per second: {took:.0f} s, {len(writer.parked)} parkings")
    assert took < 40 * 1.5
    assert len(writer.parked) < 30 * 3  # parked messages are not claimed and parked again every round


def test_parked_messages_return_paced_at_the_destinations_delivery_rate(make_config):
    shares = Shares(make_config(qmgr_message_active_limit=400, qmgr_destination_active_share=25,
                                queue_run_delay="300s"))
    key = ("smtp", "far.example")
    for n in range(200):  # ten jobs a second
        shares.completed(key, 1000 + n * 0.1)
    returns = [shares.park_until([key], 1020.0, retry=True) - 1020.0 for _ in range(100)]
    assert 4 < returns[0] < 6  # half the share (50 jobs) at ten a second
    assert all(0.09 < later - earlier < 0.11 for earlier, later in itertools.pairwise(returns))
    assert shares.park_until([key], 1020.0, retry=False) - 1020.0 < 6  # new mail is not paced behind retries
    shares.relieved(key, retry=True)
    assert shares.park_until([key], 1030.0, retry=True) - 1030.0 < 6  # a new spell is paced from scratch


def test_a_destination_that_completes_nothing_parks_up_to_queue_run_delay(make_config):
    shares = Shares(make_config(qmgr_message_active_limit=100, queue_run_delay="60s"))
    key = ("smtp", "tarpit.example")
    returns = [shares.park_until([key], 0.0, retry=False) for _ in range(200)]
    assert returns[0] == shares.limit / 2  # one job a second assumed
    assert max(returns) == 60


@pytest.mark.parametrize("share, limit, expected", [(25, 20000, 5000), (25, 2, 1), (100, 40, 40), (0, 40, 1)])
def test_a_destinations_share_is_a_percentage_of_the_active_limit(make_config, share, limit, expected):
    shares = Shares(make_config(qmgr_destination_active_share=share, qmgr_message_active_limit=limit))
    assert shares.limit == expected


async def test_parked_messages_are_claimed_again_when_due_while_the_destination_is_stuck(tmp_path, nursery,
                                                                                       autojump_clock):
    """Nothing completes (a tarpit) and the active queue has room: the round still
    wakes when the parked messages are due, finds the destination still congested
    and parks them again, later."""
    queue_messages(tmp_path / "queue", [f"u{i}@far.example" for i in range(60)])
    peer = Peer(hold=True)  # never released
    scheduler, writer = await start(nursery, tmp_path, peer, qmgr_message_active_limit=100,
                                    default_destination_concurrency_limit=5, relay_destination_concurrency_limit=5)
    with trio.fail_after(600):
        while len(writer.parked) < 70:
            await trio.testing.wait_all_tasks_blocked()
            await trio.sleep(1)  # MockClock: lets the parked messages come due
    first, second = writer.parked[:35], writer.parked[35:70]
    assert {m for m, _ in first} == {m for m, _ in second}
    assert min(u for _, u in second) > max(u for _, u in first) - 1  # parked again, later
    assert len(scheduler.active) == 25


async def test_new_mail_for_a_destination_congested_with_retries_is_not_parked_behind_them(tmp_path, nursery,
                                                                                         autojump_clock):
    """60 due retries hold one destination's share (10 of an active queue of 40);
    new mail that arrives meanwhile is delivered within a few deliveries, not
    after the parked retries."""
    queue_due_retries(tmp_path / "queue", 60)
    peer = Peer(hold=True)
    scheduler, writer = await start(nursery, tmp_path, peer, qmgr_message_active_limit=40,
                                    default_destination_concurrency_limit=2, relay_destination_concurrency_limit=2)

    async def one_per_second() -> None:
        while True:
            await trio.sleep(1)  # the peer's pace (MockClock time), not synchronisation
            peer.released.release()

    nursery.start_soon(one_per_second)
    await peer.until(lambda: len(peer.delivered) >= 5, timeout=100)
    assert writer.parked  # the retries hold the destination's share
    queue_messages(tmp_path / "queue", [f"n{i}@far.example" for i in range(5)], prefix="N")
    scheduler.wake()  # as a session does after committing new mail to incoming
    arrived = len(peer.delivered)
    await peer.until(lambda: sum(a.startswith("n") for _, a in peer.delivered) == 5, timeout=1000)
    print(f"\nnew mail delivered after {len(peer.delivered) - arrived} more deliveries")
    assert len(peer.delivered) - arrived <= 15
