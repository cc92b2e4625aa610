"""dns_concurrency_limit's turns shared out by zone (``net/dnsturns.py``), under trio's
MockClock: a zone holding turns keeps off the last free quarter, zones holding
none go first, and a cancelled waiter gives its place back."""

from __future__ import annotations

import trio
import trio.testing

from trimail.net.dnsturns import Turns, zone_of


def test_a_name_belongs_to_its_registered_domain():
    assert zone_of("d17.silent.example") == "silent.example"
    assert zone_of("x.y.silent.example.") == "silent.example"
    assert zone_of("mx.example.co.uk") == "example.co.uk"
    assert zone_of("4.3.2.1.in-addr.arpa") == "1.in-addr.arpa"
    assert zone_of("example") == "example"


async def hold(turns: Turns, zone: str, until: trio.Event, got: list[str]) -> None:
    async with turns.turn(zone):
        got.append(zone)
        await until.wait()


async def test_one_zone_takes_at_most_three_quarters_and_another_gets_a_turn_at_once(autojump_clock):
    turns, done, got = Turns(8), trio.Event(), []
    async with trio.open_nursery() as nursery:
        for _ in range(20):  # a silent zone's lookups, more than there are turns
            nursery.start_soon(hold, turns, "silent.example", done, got)
        await trio.testing.wait_all_tasks_blocked()
        assert turns.held == {"silent.example": 6} and turns.used == 6  # 2 of 8 kept free
        with trio.fail_after(1):
            async with turns.turn("good.example"):
                async with turns.turn("other.example"):
                    assert turns.used == 8
        done.set()
    assert turns.used == 0 and not turns.held and turns.waiting == 0


async def test_zones_holding_no_turn_go_first_and_then_in_turn(autojump_clock):
    turns, gates, got = Turns(1), [trio.Event() for _ in range(6)], []
    async with trio.open_nursery() as nursery:
        for i, zone in enumerate(["a.example", "a.example", "a.example", "b.example", "c.example"]):
            nursery.start_soon(hold, turns, zone, gates[i], got)
            await trio.testing.wait_all_tasks_blocked()
        for gate in gates[:5]:  # each lookup in turn ends
            gate.set()
            await trio.testing.wait_all_tasks_blocked()
    assert got == ["a.example", "b.example", "c.example", "a.example", "a.example"]


async def test_a_lookup_cancelled_while_waiting_gives_its_place_back(autojump_clock):
    turns, done, got = Turns(1), trio.Event(), []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold, turns, "a.example", done, got)
        await trio.testing.wait_all_tasks_blocked()
        with trio.move_on_after(1):  # waits, then gives up
            async with turns.turn("b.example"):
                raise AssertionError("no turn was free")
        assert turns.waiting == 0
        nursery.start_soon(hold, turns, "c.example", done, got)
        await trio.testing.wait_all_tasks_blocked()
        done.set()
    assert got == ["a.example", "c.example"] and turns.used == 0 and not turns.held
