"""Resting smtpd workers (trimail.processes.turns): who is idle on the session board,
who signals its wake-up descriptor and when, and how a resting or deferring worker
answers the signal.  Real boards (a memfd and an eventfd), trio's MockClock."""

from __future__ import annotations

import os
import select

import pytest
import trio

from trimail.processes.board import DEFER_LIGHT, DEFER_UNDER_LOAD, SessionBoard
from trimail.processes.turns import RECHECK, Turns


def _boards(count: int) -> tuple[SessionBoard, list[SessionBoard]]:
    master = SessionBoard.create()
    for slot in range(count):
        master.hand_out(slot)
    return master, [SessionBoard(master.fd, slot, master.wake) for slot in range(count)]


def _signalled(board: SessionBoard) -> bool:
    """Whether a signal was given since the last call (the test reads the counter;
    the workers never do, see test_every_worker_gets_every_signal)."""
    readable = bool(select.select([board.wake], [], [], 0)[0])
    _reset(board)
    return readable


def _reset(board: SessionBoard) -> None:
    try:
        os.eventfd_read(board.wake)
    except BlockingIOError:
        pass


def test_a_lone_clients_sessions_signal_nobody_and_the_other_worker_stays_idle() -> None:
    master, (first, second) = _boards(2)
    assert not first.idle() and second.idle()  # the first's turn; the second may rest
    for _ in range(3):
        first.add(1)  # its session
        assert not _signalled(master) and second.idle()
        first.add(-1)
    first.add(1)
    first.add(1)  # a second client while the first is there: the next one is the second worker's
    assert _signalled(master) and not second.idle() and second.my_turn()
    second.add(1)  # three sessions on two workers: load, everyone watches
    assert _signalled(master)
    assert not any(board.idle() for board in (first, second))


def test_under_load_only_a_session_that_gives_another_worker_the_turn_signals() -> None:
    """A deferring worker is woken only when its turn has come (it waits with the
    descriptor), not by every session the others take."""
    master, (first, second) = _boards(2)
    first.add(3)
    second.add(3)
    _reset(master)
    first.add(1)  # 4 against 3: both still within one of the least busy
    second.add(1)
    first.add(1)
    first.add(1)  # 6 against 4: the first is ahead now, nobody gained the turn
    assert not _signalled(master)
    assert not first.my_turn()
    second.add(1)  # 6 against 5: the first's turn again
    assert _signalled(master) and first.my_turn()


def test_a_worker_with_a_session_never_rests() -> None:
    master, (first, second) = _boards(2)
    second.add(1)
    assert first.my_turn() and not second.my_turn() and not second.idle()


def test_stopping_to_accept_and_a_dead_workers_slot_pass_the_turn_with_a_signal() -> None:
    master, (first, second) = _boards(2)
    first.stop_accepting()
    assert _signalled(master) and second.my_turn() and not second.idle() and not first.idle()
    master, (first, second) = _boards(2)
    first.add(2)
    _reset(master)
    master.clear(0)  # it died: its sessions with it
    assert _signalled(master) and second.my_turn()


def test_a_lone_worker_signals_nothing() -> None:
    master = SessionBoard.create()
    master.hand_out(0)
    alone = SessionBoard(master.fd, 0)  # one worker: no descriptor, no turns
    alone.add(5)
    assert not _signalled(master)


async def test_a_resting_worker_wakes_when_signalled(autojump_clock) -> None:
    master, (first, second) = _boards(2)
    turns, done = Turns(second), trio.Event()

    async def rest() -> None:
        await turns.rest()
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(rest)
        await trio.sleep(RECHECK / 2)
        assert not done.is_set()
        first.add(1)
        first.add(1)  # the turn passes to the second worker: first signals it
        with trio.fail_after(RECHECK / 4):
            await done.wait()


async def test_a_resting_worker_looks_again_after_recheck_without_a_signal(autojump_clock) -> None:
    master, (first, second) = _boards(2)
    started = trio.current_time()
    await Turns(second).rest()
    assert trio.current_time() - started == pytest.approx(RECHECK)


async def test_a_signal_given_before_the_rest_is_not_lost_nor_an_old_one_obeyed(autojump_clock) -> None:
    master, (first, second) = _boards(2)
    master.signal()  # an old signal: the board says rest, so it rests
    started = trio.current_time()
    await Turns(second).rest()
    assert trio.current_time() - started == pytest.approx(RECHECK)
    first.add(2)  # its turn now: rest returns at once
    started = trio.current_time()
    await Turns(second).rest()
    assert trio.current_time() == started


async def test_every_listener_of_a_worker_rests_on_one_wait(autojump_clock) -> None:
    master, (first, second) = _boards(2)
    turns, woke = Turns(second), []

    async def rest(name: str) -> None:
        await turns.rest()
        woke.append(name)

    async with trio.open_nursery() as nursery:
        for name in ("smtp", "submission", "smtps"):  # trio lets one task wait on a descriptor
            nursery.start_soon(rest, name)
        await trio.sleep(RECHECK / 2)
        first.add(2)
    assert sorted(woke) == ["smtp", "smtps", "submission"]


async def test_a_deferring_worker_takes_the_connection_as_soon_as_the_turn_is_its_own(autojump_clock) -> None:
    """The first worker has taken two sessions and lets the next connection wait
    DEFER_LIGHT for the second; the second's session makes it load, and the first's
    turn, so the first stops waiting then (not after the whole delay, while the second
    takes every connection)."""
    master, (first, second) = _boards(2)
    first.add(2)
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(Turns(first).defer)
        await trio.sleep(DEFER_LIGHT / 4)
        second.add(1)
    assert trio.current_time() - started == pytest.approx(DEFER_LIGHT / 4)
    first.add(1)  # 3 against 1: the first is ahead and waits its turn
    started = trio.current_time()
    await Turns(first).defer()  # no signal comes: the whole delay
    assert trio.current_time() - started == pytest.approx(DEFER_UNDER_LOAD)
    started = trio.current_time()
    await Turns(second).defer()  # its turn: no wait
    assert trio.current_time() == started


async def test_every_worker_gets_every_signal(autojump_clock) -> None:
    """The first worker's second session gives the second worker the turn, and the
    first then defers a connection for it: the first's look at the board must not
    take the signal from the resting second (a first version read the shared
    counter, and under CI load sessions went 20 / 0), nor a third resting worker's
    from it.  Each worker watches the signals through its own epoll."""
    master, (first, second, third) = _boards(3)
    first.add(1)  # 1, 0, 0: the first's turn; the others rest
    woke: list[str] = []

    async def rest(name: str, turns: Turns) -> None:
        await turns.rest()
        woke.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(rest, "second", Turns(second))
        nursery.start_soon(rest, "third", Turns(third))
        await trio.sleep(RECHECK / 10)
        started = trio.current_time()
        first.add(1)  # 2, 0, 0: the second's turn, signalled
        await Turns(first).defer()  # looks at the board (and the signals) before the others run
        assert trio.current_time() - started == pytest.approx(DEFER_LIGHT)  # its whole delay
        assert sorted(woke) == ["second", "third"]  # the third returns too, to look again
    assert trio.current_time() < RECHECK
