"""Concurrency feedback per destination (Postfix's qmgr_queue.c / qmgr_feedback.c):
end to end against a connection-limited peer, and the window arithmetic itself."""

from __future__ import annotations

import dataclasses
import logging
import time

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import wait_for
from tests.delivery.test_delivery import queue, send, wait_empty
from tests.scheduler.fleet import Fleet
from tests.scheduler.qmgr_fake import REFUSED, FakeQmgr, FakeSite
from trimail.config.values import parse_feedback
from trimail.delivery.outcome import deferred
from trimail.delivery.route import Route
from trimail.scheduler.dead import DeadSites
from trimail.scheduler.feedback import Window, WindowSettings
from trimail.scheduler.slots import AgentSlots


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


async def test_a_site_allowing_two_sessions_gets_all_30_messages_in_one_run(start_mta,
                                                                              ephemeral_fleet: Fleet):
    """A peer that allows 2 concurrent sessions and answers 421 beyond that: the
    421s lower the destination's window and leave the mail queued for the sessions
    that are up; all 30 messages are delivered in this run (none waits for
    minimal_backoff_time), and the peer never has more than 2 sessions."""
    peer = ephemeral_fleet.peer("limited", session_limit=2, delay=0.1)
    smtp_log = logging.getLogger("trimail.smtp")
    lines = Lines()
    smtp_log.addHandler(lines)
    level = smtp_log.level
    smtp_log.setLevel(logging.INFO)
    try:
        srv = await start_mta(relayhost=f"[{peer.host}]:{peer.port}")
        started = trio.current_time()
        for i in range(30):
            await send(srv, "a@client.example", [f"r{i}@far.example"])
        await wait_empty(srv, timeout=30)
        took = trio.current_time() - started
    finally:
        smtp_log.removeHandler(lines)
        smtp_log.setLevel(level)
    deferred = [line for line in lines.lines if "status=deferred" in line]
    print(f"\n30 messages to a 2-session peer: {took:.1f} s, {peer.sessions} sessions, "
          f"{peer.turned_away} refused with 421, most at once {peer.sessions_max}, {len(deferred)} deferred")
    assert sorted(peer.recipients) == sorted(f"r{i}@far.example" for i in range(30))
    assert peer.turned_away >= 1  # the window was tried above 2: the feedback had work to do
    assert peer.sessions_max <= 2
    assert deferred == []
    assert not queue(srv)


async def test_421_beyond_the_limit_costs_few_connections(start_mta, ephemeral_fleet: Fleet):
    """Negative feedback: after the first 421s the window shrinks to what the site
    allows, so a backlog of 40 messages costs a handful of refused connections, not
    one per message."""
    peer = ephemeral_fleet.peer("limited", session_limit=1, delay=0.05)
    srv = await start_mta(relayhost=f"[{peer.host}]:{peer.port}")
    for i in range(40):
        await send(srv, "a@client.example", [f"r{i}@far.example"])
    await wait_for(lambda: len(peer.recipients) == 40, timeout=30)
    await wait_empty(srv)
    print(f"\n40 messages to a 1-session peer: {peer.sessions} sessions, {peer.turned_away} refused")
    assert peer.sessions_max == 1
    assert peer.turned_away <= 8


# -- the window's arithmetic (Postfix's qmgr_queue_throttle / _unthrottle) ---------------


def window(initial: int = 5, limit: int = 20, positive: str = "1", negative: str = "1",
           cohorts: int = 1, **kw: bool) -> Window:
    return Window(WindowSettings(limit, initial, parse_feedback(positive), parse_feedback(negative), cohorts), **kw)


def test_the_window_starts_at_initial_destination_concurrency_within_the_limit():
    assert window().size == 5
    assert window(initial=5, limit=3).size == 3
    assert window(probing=True).size == 1  # back from the dead: one connection first


def test_positive_feedback_1_adds_one_per_success_up_to_the_limit_and_near_use():
    w = window(limit=8)
    for _ in range(2):
        w.succeeded(workers=5)
    assert w.size == 7
    for _ in range(5):
        w.succeeded(workers=5)
    assert w.size == 8  # the limit
    near = window()
    for _ in range(10):
        near.succeeded(workers=1)
    assert near.size == 6  # grows only while below its workers + initial


def test_positive_feedback_1_over_concurrency_adds_one_per_window_of_successes():
    w = window(positive="1/concurrency")
    for _ in range(4):
        w.succeeded(workers=5)
    assert w.size == 5
    w.succeeded(workers=5)  # the fifth of a window of 5
    assert w.size == 6


def test_negative_feedback_drops_at_once_and_never_below_one():
    w = window()
    sizes = []
    for _ in range(5):
        w.failed()
        sizes.append(w.size)
    assert sizes == [3, 2, 1, 1, 1]  # Postfix's overshoot: the first step of a fresh window is 2
    slow = window(negative="1/concurrency")
    slow.failed()
    assert slow.size == 4  # the decrease comes at the start of the sequence
    for _ in range(2):  # 0.8 of the first sequence is left: 3 more failures of 1/4
        slow.failed()
    assert slow.size == 4
    slow.failed()
    assert slow.size == 3


def test_feedback_0_means_no_adjustment():
    w = window(positive="0", negative="0")
    for _ in range(10):
        w.succeeded(workers=5)
        w.failed()
    assert w.size == 5


def test_a_failed_cohort_is_a_windows_worth_of_failures_without_a_success():
    w = window(negative="0")  # the window stays 5: a cohort is 5 failures
    assert [w.failed() for _ in range(5)] == [False] * 4 + [True]
    w = window(negative="0")
    for _ in range(4):
        w.failed()
    w.delivered(0, 0.0)  # a delivery that went through starts the count again
    assert [w.failed() for _ in range(5)] == [False] * 4 + [True]
    w = window(negative="0", cohorts=2)
    assert sum(w.failed() for _ in range(10)) == 1
    assert not any(window(cohorts=0).failed() for _ in range(50))  # 0: never dead


@given(numerator=st.integers(0, 100), denominator=st.integers(1, 1000), size=st.integers(1, 1000))
def test_feedback_values_are_postfix_forms(numerator, denominator, size):
    value = numerator / 100
    assert parse_feedback(f"{value}/concurrency").at(size) == pytest.approx(value / size)
    assert parse_feedback(f"{value} / {denominator}").at(size) == pytest.approx(value / denominator)
    assert parse_feedback(str(value)).at(size) == pytest.approx(value)


@pytest.mark.parametrize("text", ["2", "1/0", "-1", "1/concurrence", "x", "1/2/3", ""])
def test_bad_feedback_values_are_configuration_errors(text):
    with pytest.raises(ValueError):
        parse_feedback(text)


# -- workers against scripted sites (trio's MockClock: no sockets, no sleeps) -------------


ROUTE = Route("smtp", "far.example", 25, True)


async def run_site(make_config, site: FakeSite, jobs: int, **params: object) -> FakeQmgr:
    q = FakeQmgr(make_config(**params), site)
    async with trio.open_nursery() as nursery:
        q.nursery = nursery
        for i in range(jobs):
            q.enqueue(ROUTE, f"r{i}@far.example")
    return q


@pytest.mark.parametrize("negative", ["1", "1/concurrency", "0"])
async def test_refusals_while_a_connection_is_up_never_defer_and_never_loop(make_config, autojump_clock, negative):
    """A site that allows one session: every job is delivered over it, none is
    deferred, and the refused attempts are bounded even with no negative feedback."""
    site = FakeSite(max_sessions=1)
    q = await run_site(make_config, site, 10, default_destination_concurrency_negative_feedback=negative)
    assert sorted(site.delivered) == sorted(f"r{i}@far.example" for i in range(10))
    assert all(o.status == "sent" for _, o in q.completed)
    assert site.most_open == 1
    assert site.refused <= 5  # the first window's extra workers (5 - 1), and the one its first success allowed
    assert not q.destinations


async def test_a_whole_failed_cohort_with_nothing_up_makes_the_destination_dead(make_config, autojump_clock):
    site = FakeSite(max_sessions=0)
    q = await run_site(make_config, site, 10, minimal_backoff_time="300s")
    assert site.attempts == 5  # one cohort, in parallel: the initial window
    outcomes = [o for _, o in q.completed]
    assert len(outcomes) == 10 and all(o.status == "deferred" for o in outcomes)
    assert outcomes[0].text == REFUSED.text
    assert all(o.text == "delivery temporarily suspended: " + REFUSED.text for o in outcomes[1:])
    [site_info] = q.dead.snapshot(time.time())
    assert site_info.destination == "smtp:far.example" and site_info.reason.startswith("4.7.0 ")


async def test_one_job_at_a_time_to_a_dead_site_pays_one_cohort(make_config, autojump_clock):
    """Jobs that come one by one: each failed attempt defers its own job (as Postfix
    defers the delivery the attempt was for) until the window's cohort has failed;
    after that new jobs are refused at once, without an attempt."""
    site = FakeSite(max_sessions=0)
    q = FakeQmgr(make_config(), site)
    async with trio.open_nursery() as nursery:
        q.nursery = nursery
        for i in range(10):
            q.enqueue(ROUTE, f"r{i}@far.example")
            await trio.sleep(1)  # (the MockClock's time: the next message comes later)
    assert site.attempts == 3  # windows 5, 3, 2: 1/5 + 1/3 + 1/2 >= 1 cohort
    texts = [o.text for _, o in q.completed]
    assert texts[:3] == [REFUSED.text] * 3
    assert all(t.startswith("delivery temporarily suspended: ") for t in texts[3:])


async def test_with_no_cohort_limit_each_attempt_defers_its_own_job(make_config, autojump_clock):
    site = FakeSite(max_sessions=0)
    q = await run_site(make_config, site, 6, default_destination_concurrency_failed_cohort_limit="0")
    # the parallel attempts of the first window leave the jobs to the last one; it then
    # makes an attempt per job, each deferring its own job
    assert site.attempts <= 6 + 5
    assert [o.text for _, o in q.completed] == [REFUSED.text] * 6
    assert not q.dead.snapshot(time.time())


async def test_a_destination_back_from_the_dead_is_probed_with_one_connection(make_config, autojump_clock):
    site = FakeSite(max_sessions=0)
    q = FakeQmgr(make_config(minimal_backoff_time="10s"), site)
    async with trio.open_nursery() as nursery:
        q.nursery = nursery
        for i in range(10):
            q.enqueue(ROUTE, f"a{i}@far.example")
    assert site.attempts == 5
    q.dead._dead[ROUTE.key] = (dataclasses.replace(q.dead._dead[ROUTE.key][0], until=time.time() - 1),
                               q.dead._dead[ROUTE.key][1])  # its dead time is over
    async with trio.open_nursery() as nursery:
        q.nursery = nursery
        for i in range(10):  # the retries, all at once
            q.enqueue(ROUTE, f"a{i}@far.example")
    assert site.attempts == 6  # one probe (a window of 1), then dead again
    assert q.dead.refusal(ROUTE.key, time.time()) is not None


def test_dead_sites_are_remembered_for_their_time_and_memory_stays_bounded():
    dead = DeadSites()
    outcome = deferred("4.4.1", "connect to x[192.0.2.1]:25: Connection refused")
    dead.mark(("smtp", "x"), "smtp:x", outcome, now=1000.0, duration=300.0)
    refusal = dead.refusal(("smtp", "x"), 1299.0)
    assert refusal is not None and refusal.text == "delivery temporarily suspended: " + outcome.text
    assert dead.refusal(("smtp", "x"), 1300.0) is None
    assert [s.destination for s in dead.snapshot(1299.0)] == ["smtp:x"] and not dead.snapshot(1300.0)
    assert not dead.revived(("smtp", "x"), 1299.0)
    assert dead.revived(("smtp", "x"), 1300.0) and not dead.revived(("smtp", "x"), 1300.0)
    for i in range(10_000):  # many sites die over the hours: old entries are swept
        dead.mark(("smtp", str(i)), f"smtp:{i}", outcome, now=1000.0 + i, duration=300.0)
    assert len(dead) <= 2 * 600 + 16  # those of the last two dead periods, twice over at most
    dead.flush()  # `trimail queue flush`, ETRN: everyone is tried again now
    assert len(dead) == 0 and dead.refusal(("smtp", "9999"), 10_999.0) is None


async def test_connections_that_are_up_keep_delivering_when_the_window_shrinks(make_config, autojump_clock):
    """Ten workers to a site that allows two: eight 421s take the window from 10 to
    1, but the two sessions that are up keep delivering (the window bounds new
    connections), so 20 one-second deliveries take 10 s, not 19."""
    site = FakeSite(max_sessions=2)
    started = trio.current_time()
    q = await run_site(make_config, site, 20, initial_destination_concurrency="10",
                       default_destination_concurrency_positive_feedback="0")
    took = site.last_delivery - started
    assert sorted(site.delivered) == sorted(f"r{i}@far.example" for i in range(20))
    assert q.destinations == {} and site.refused == 8 and site.most_open == 2
    assert took < 11, took


def test_deliveries_over_reused_connections_grow_a_window_once_the_site_stops_refusing():
    """Postfix gives positive feedback per delivery (qmgr_queue_unthrottle): a window
    shrunk by 421s grows again while its connections are reused, but not while
    refusals are recent (each growth would be one more refused connection)."""
    from trimail.scheduler.feedback import QUIET

    w = window(initial=5)
    for _ in range(2):
        w.failed(100.0)  # two 421s: the window shrinks to 2 (the first drops it by 2, as in Postfix)
    assert w.size == 2
    w.delivered(2, 100.0 + QUIET / 2)
    assert w.size == 2  # refusals are recent: no growth
    for i in range(3):
        w.delivered(2, 100.0 + QUIET + i)
    assert w.size == 5  # quiet for QUIET seconds: one per delivery, up to workers + initial


async def test_a_worker_waiting_for_dns_that_never_answers_holds_no_slot(make_config, autojump_clock):
    """Red team 39's lead: a worker took its delivery agent's slot before its MX
    lookup, so destinations whose DNS never answers held every slot and mail to a
    healthy one waited for their lookups to time out.  With the only slot and a
    silent destination's worker in its lookup, the healthy one is delivered at once."""
    site = FakeSite(max_sessions=10, delivery_time=0.1)
    q = FakeQmgr(make_config(), site)
    q.agents = AgentSlots(1)
    q.connector.silent.add("silent.example")
    silent = Route("smtp", "silent.example", 25, True)
    async with trio.open_nursery() as nursery:
        q.nursery = nursery
        q.enqueue(silent, "r@silent.example")
        await trio.testing.wait_all_tasks_blocked()
        assert q.connector.looking_up == 1
        q.enqueue(ROUTE, "r@far.example")
        with trio.fail_after(5):
            while not site.delivered:
                await trio.sleep(0.1)  # (MockClock time)
        assert silent.key not in q.agents.held and q.connector.looking_up == 1  # it holds no slot
        nursery.cancel_scope.cancel()
