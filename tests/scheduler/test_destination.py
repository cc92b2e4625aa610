"""A destination's idle workers: a new job wakes one of them, not all (trio's
MockClock and wait_all_tasks_blocked: no sockets, no real waiting)."""

from __future__ import annotations

import trio
import trio.testing

from trimail.delivery.route import Route
from trimail.queue.transitions import ClaimedMessage
from trimail.scheduler.destination import Destination, Job

ROUTE = Route("smtp", "127.0.0.1", 2525, False)


def job(name: str) -> Job:
    return Job(ClaimedMessage(name, "", 0.0, 0.0, 0, {}, []), [], ROUTE, ROUTE.key)


async def test_a_new_job_wakes_only_the_worker_that_became_idle_last(autojump_clock):
    """Three workers wait for a job with their connections open; one job wakes the
    last of them to become idle (its connection is the warmest) and leaves the other
    two asleep: waking them all cost every idle worker a wake-up per message."""
    dest = Destination(ROUTE, 5, ROUTE.key)
    taken: dict[str, str | None] = {}

    async def worker(name: str) -> None:
        got = await dest.next_job(linger=60.0)
        taken[name] = got.message.id if got is not None else None

    async with trio.open_nursery() as nursery:
        for name in ("a", "b", "c"):
            nursery.start_soon(worker, name)
            await trio.testing.wait_all_tasks_blocked()
        asleep = list(dest.idle)
        assert len(asleep) == 3
        dest.add(job("m1"))
        await trio.testing.wait_all_tasks_blocked()
        assert taken == {"c": "m1"}
        assert dest.idle == asleep[:2]  # the same waits: a and b were never woken
        dest.add(job("m2"))
        await trio.testing.wait_all_tasks_blocked()
        assert taken == {"c": "m1", "b": "m2"}
        nursery.cancel_scope.cancel()
    assert not dest.idle


async def test_a_job_taken_before_the_woken_worker_runs_leaves_it_waiting_for_the_next(autojump_clock):
    """A worker that finishes its delivery takes the waiting job at once; the idle
    worker woken for it finds nothing, waits again, and the next job wakes it: no
    job is left waiting while a worker sleeps."""
    dest = Destination(ROUTE, 5, ROUTE.key)
    taken: list[str] = []

    async def idle_worker() -> None:
        got = None
        while got is None:  # its linger is long enough for both jobs
            got = await dest.next_job(linger=60.0)
        taken.append(got.message.id)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(idle_worker)
        await trio.testing.wait_all_tasks_blocked()
        dest.add(job("m1"))
        busy_one = await dest.next_job(linger=0.0)  # a worker back from its delivery, before the woken one ran
        assert busy_one is not None and busy_one.message.id == "m1"
        await trio.testing.wait_all_tasks_blocked()
        assert taken == [] and len(dest.idle) == 1
        dest.add(job("m2"))
        await trio.testing.wait_all_tasks_blocked()
        assert taken == ["m2"] and not dest.jobs


async def test_a_worker_whose_linger_is_over_is_no_longer_woken(autojump_clock):
    """Past its linger (smtp_connection_cache_time_limit) a worker leaves with no job
    and is off the idle list: a later job is not announced to it, it waits for a
    worker of its own."""
    dest = Destination(ROUTE, 5, ROUTE.key)
    with trio.fail_after(10):
        assert await dest.next_job(linger=2.0) is None
    assert not dest.idle
    dest.add(job("m1"))
    assert len(dest.jobs) == 1


async def test_a_worker_cancelled_after_its_wake_up_still_takes_the_job(autojump_clock):
    """The one idle worker a job woke is cancelled before it runs (asked by the red
    team: is the wake-up lost, and the job left for a whole linger?).  No: trio hands
    a woken task its wake-up before any cancellation, and next_job takes the job
    with no schedule point in between; the cancellation comes at the worker's next
    one, with the job in hand (a stopping qmgr returns its messages to incoming)."""
    dest = Destination(ROUTE, 5, ROUTE.key)
    taken: list[str] = []

    async def idle_worker(scope_box: list) -> None:
        with trio.CancelScope() as scope:
            scope_box.append(scope)
            got = await dest.next_job(linger=60.0)
            if got is not None:
                taken.append(got.message.id)

    first: list = []
    last: list = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(idle_worker, first)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(idle_worker, last)
        await trio.testing.wait_all_tasks_blocked()
        dest.add(job("m1"))  # wakes the last to become idle ...
        last[0].cancel()  # ... which is cancelled before it runs
        with trio.fail_after(1):  # (the linger is 60 s: a lost wake-up would leave the job that long)
            while not taken:
                await trio.sleep(0.01)
        assert taken == ["m1"] and not dest.jobs
