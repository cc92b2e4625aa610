"""default_process_limit's slots go round-robin over destinations (scheduler/slots.py)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from trimail.scheduler import slots as slots_module
from trimail.scheduler.slots import AgentSlots


async def _take(slots: AgentSlots, key: tuple, order: list[tuple], hold: trio.Event) -> None:
    await slots.acquire(key)
    order.append(key)
    await hold.wait()
    slots.release(key)


async def test_a_free_slot_goes_first_to_a_destination_holding_none():
    """Two slots held by A; A queues three more workers, then B queues one: the next
    free slots go to B first (it holds none), then to A (a plain FIFO limiter
    served A's whole queue first: a destination behind another's backlog waited)."""
    slots = AgentSlots(2)
    order: list[tuple] = []
    holds = [trio.Event() for _ in range(6)]
    async with trio.open_nursery() as nursery:
        for i in range(5):
            nursery.start_soon(_take, slots, ("A",), order, holds[i])
            await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(_take, slots, ("B",), order, holds[5])
        await trio.testing.wait_all_tasks_blocked()
        assert order == [("A",), ("A",)] and slots.waiting == 4 and slots.starving()
        holds[0].set()  # one of A's workers is done
        await trio.testing.wait_all_tasks_blocked()
        assert order[-1] == ("B",) and not slots.starving()
        for hold in holds:
            hold.set()
    assert order == [("A",), ("A",), ("B",), ("A",), ("A",), ("A",)]
    assert slots.used == 0 and slots.waiting == 0 and slots.held == {}


async def test_destinations_with_slots_take_further_ones_in_turn():
    slots = AgentSlots(1)
    order: list[tuple] = []
    gate = trio.Event()
    async with trio.open_nursery() as nursery:
        await slots.acquire(("first",))
        for key in [("A",), ("A",), ("A",), ("B",), ("B",), ("C",)]:
            nursery.start_soon(_take, slots, key, order, gate)
            await trio.testing.wait_all_tasks_blocked()
        gate.set()
        slots.release(("first",))
    assert order == [("A",), ("B",), ("C",), ("A",), ("B",), ("A",)]


async def test_a_worker_yields_its_slot_after_its_turn_only_while_a_destination_has_none():
    clock_start = trio.current_time()
    slots = AgentSlots(2)
    await slots.acquire(("A",))
    await slots.acquire(("A",))
    assert not slots.should_yield(("A",), clock_start)  # nobody waits
    async with trio.open_nursery() as nursery:
        nursery.start_soon(slots.acquire, ("B",))
        await trio.testing.wait_all_tasks_blocked()
        assert not slots.should_yield(("A",), trio.current_time())  # its turn is not over
        await trio.sleep(slots_module.TURN)
        assert slots.should_yield(("A",), clock_start)  # A holds two: it yields after TURN
        slots.release(("A",))
    assert slots.held == {("A",): 1, ("B",): 1} and not slots.starving()
    assert not slots.should_yield(("A",), clock_start)


async def test_a_lone_slot_is_kept_longer():
    slots = AgentSlots(1)
    start = trio.current_time()
    await slots.acquire(("A",))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(slots.acquire, ("B",))
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(slots_module.TURN)
        assert not slots.should_yield(("A",), start)  # A's only slot: LONE_TURN
        await trio.sleep(slots_module.LONE_TURN - slots_module.TURN)
        assert slots.should_yield(("A",), start)
        slots.release(("A",))
    assert slots.held == {("B",): 1}


async def _work(slots: AgentSlots, key: tuple) -> None:
    await slots.acquire(key)  # as run_worker does: a slot acquired is released, whatever happens
    try:
        await trio.sleep_forever()
    finally:
        slots.release(key)


@pytest.mark.parametrize("granted_first", [False, True])
async def test_a_cancelled_worker_leaves_no_trace(granted_first):
    slots = AgentSlots(1)
    await slots.acquire(("A",))
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_work, slots, ("B",))
            await trio.testing.wait_all_tasks_blocked()
            if granted_first:
                slots.release(("A",))  # B is granted, then cancelled
            scope.cancel()
    if not granted_first:
        slots.release(("A",))
    assert slots.used == 0 and slots.waiting == 0 and slots.held == {} and not slots.starving()
    await slots.acquire(("C",))  # and the slot is usable
    assert slots.held == {("C",): 1}


async def test_a_reload_that_raises_the_limit_grants_at_once():
    slots = AgentSlots(1)
    await slots.acquire(("A",))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(slots.acquire, ("B",))
        await trio.testing.wait_all_tasks_blocked()
        slots.total_tokens = 2
    assert slots.held == {("A",): 1, ("B",): 1}
