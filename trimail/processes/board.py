"""The session board: every smtpd worker's count of open sessions, in one page of
shared memory, so ``smtpd_process_limit`` and stress mode count the sessions of
all workers together (Postfix counts them in master(8) for all smtpd processes).

The master creates it (a memfd, inherited by every worker) and gives each worker
its own slot; a worker writes only its slot and reads the others (the sum, and
whose turn it is to accept: ``accept_delay``), so no lock is needed (an aligned 8-byte
store is atomic, and a sum that is one update behind is as good as a count taken
a moment earlier).  The master clears the slot of a worker that died, whose
sessions died with it.  After the slots, the master keeps how many of them it
ever handed out (it hands out the lowest free one), so a reader scans those
only: with two workers, two slots of 256, on every connection and session.

Beside the page, a wake-up descriptor (an eventfd, ``wake``): a worker with
nothing to do on the listening sockets (``idle``: light load, another's turn, no
session of its own) rests on it instead of being woken by every connection
(processes.turns.Turns.rest), and whatever may give it the turn signals it: a
worker whose new session makes the load heavy or passes the turn on, a worker that
stops accepting, the master clearing a dead worker's slot.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import mmap
import os
import struct

SLOTS = 256
DEFER_UNDER_LOAD = 0.001  # seconds a connection waits for the worker whose turn it is, under load ...
DEFER_LIGHT = 0.01  # ... and under light load, where that worker is idle: the others wake less often
_ALL = struct.Struct(f"={SLOTS}q")
_ONE = struct.Struct("=q")
_HIGH = _ALL.size  # offset of the count of slots ever handed out
_SIZE = _ALL.size + _ONE.size


@functools.cache
def _first(count: int) -> struct.Struct:
    return struct.Struct(f"={count}q")


class SessionBoard:
    """Each slot holds ``sessions + 1`` for a worker that accepts, ``-(sessions + 1)``
    for one that no longer does (retiring or stopping), 0 for no worker."""

    def __init__(self, fd: int, slot: int | None = None, wake: int | None = None) -> None:
        self.fd = fd
        self.memory = mmap.mmap(fd, _SIZE)
        self.slot = slot
        self.wake = wake  # the eventfd idle workers rest on (None: a lone worker, nobody to wake)
        self.mine = 0
        self.accepting = True
        if slot is not None:
            self._write()

    @classmethod
    def create(cls) -> SessionBoard:
        fd = os.memfd_create("trimail-sessions", 0)
        os.ftruncate(fd, _SIZE)
        return cls(fd, wake=os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))

    def _write(self) -> None:
        assert self.slot is not None
        value = self.mine + 1
        _ONE.pack_into(self.memory, self.slot * 8, value if self.accepting else -value)

    def add(self, change: int) -> None:
        self.mine += change
        self._write()
        if change > 0 and self.wake is not None and self.slot is not None:
            after = [value - 1 for value in self._values()]
            before = list(after)
            before[self.slot] -= change
            if _whose(after)[0] - _whose(before)[0] - {self.slot}:
                self.signal()  # another's turn now (the load rose, or this one is ahead): wake it

    def stop_accepting(self) -> None:
        self.accepting = False
        self._write()
        self.signal()  # the turn passes on

    def signal(self) -> None:
        """Wake every worker resting on ``wake`` to look at the board again."""
        if self.wake is not None:
            with contextlib.suppress(OSError):  # the counter at its maximum (after 2^64 signals)
                os.eventfd_write(self.wake, 1)

    def idle(self) -> bool:
        """Whether this worker may leave the listening sockets to the others: no session
        of its own, light load, and another accepting worker's turn (who takes every
        connection at once).  A worker with a session never rests, so while any
        session is open some worker with sessions watches the sockets as well."""
        if self.mine or not self.accepting:
            return False
        mine, light = self._turn()
        return light and not mine

    def hand_out(self, slot: int) -> None:
        """The master: *slot* is about to be used (before its worker starts)."""
        if slot >= self._high():
            _ONE.pack_into(self.memory, _HIGH, slot + 1)

    def _high(self) -> int:
        return min(max(_ONE.unpack_from(self.memory, _HIGH)[0], 0), SLOTS)

    def _values(self) -> tuple[int, ...]:
        return _first(self._high()).unpack_from(self.memory)

    def total(self) -> int:
        return sum(abs(value) - 1 for value in self._values() if value)

    def my_turn(self) -> bool:
        return self._turn()[0]

    def accept_delay(self) -> float:
        """Seconds a pending connection waits before this worker takes it: none when
        it is its turn (see _turn), else DEFER_UNDER_LOAD, or under light load
        DEFER_LIGHT: the worker whose turn it is is idle then and takes it at once,
        so the others need not wake for every connection (while one waits they are
        not woken by the next ones: 0.3 ms of CPU per connection with 1 ms, on this
        VM, at 250 connections a second).  A worker with no session of its own does
        not even watch then (``idle``).  The wait ends early when the board is
        signalled and the turn is this worker's (processes.turns.Turns.defer): the
        load can rise while it waits, and with 50 ms of a wait that did not end
        early ten connections opened in a row under CI load went 2 / 8 instead of
        spreading."""
        mine, light = self._turn()
        return 0.0 if mine else DEFER_LIGHT if light else DEFER_UNDER_LOAD

    def _turn(self) -> tuple[bool, bool]:
        """(Whether this worker should take the next connection at once, whether the
        load is light).  Under light
        load (no more sessions than accepting workers): only the first (lowest slot)
        of the accepting workers with at most one session more than the least busy,
        so a lone client stays with one warm worker (its last session may not have
        ended when it connects again).  Under load: every accepting worker with at
        most one session more than the least busy, so a connection never waits for
        one busy worker while another could take it, and no worker runs ahead of the
        others."""
        whose, light = _whose([value - 1 for value in self._values()])
        return self.slot in whose, light

    def clear(self, slot: int) -> None:
        _ONE.pack_into(self.memory, slot * 8, 0)
        self.signal()  # it may have had the turn


def _whose(counts: list[int]) -> tuple[set[int], bool]:
    """(The slots whose turn it is, whether the load is light) from every slot's count
    of sessions (negative: no worker, or one that no longer accepts), by the rules of
    SessionBoard._turn."""
    accepting = [count for count in counts if count >= 0]
    least = min(accepting, default=0)
    eligible = (slot for slot, count in enumerate(counts) if 0 <= count <= least + 1)
    if sum(accepting) > len(accepting):
        return set(eligible), False
    return set(itertools.islice(eligible, 1)), True
