"""The client board: per-client connection counts and rates summed over every smtpd
worker, so ``smtpd_client_connection_count_limit`` and
``smtpd_client_connection_rate_limit`` hold for the whole service, as Postfix's
one anvil(8) server makes them hold for all its smtpd processes.

Shared memory (a memfd the master creates and every smtpd worker inherits), laid
out like the session board (trimail.processes.board): each worker writes only its
own table, in the slot the master gave it, and reads every table ever used; so
no lock is needed.  When a worker is gone the master sets its sessions to 0
(they died with it) and keeps its windows, which the next worker in the slot
takes over.  A count read while another worker writes may
be one update behind, as good as a count taken a moment earlier.

A table entry is one client address: a keyed hash of it (the key is random per
serve, so nobody can aim two addresses at one entry), its open sessions in that
worker, its rate window there (Postfix's ``anvil_rate_time_unit``: 60 s from the
client's first connection in the window) and its window of failed AUTH attempts
(``AUTH_WINDOW``, for ``smtpd_auth_failure_limit``).  A client's rate (or its
failures) is the sum over its unexpired windows in every worker.

Bounded: ``ENTRIES`` entries a worker, ``PROBES`` looked at per address (open
addressing); an entry with no open session and an expired window is free for
reuse.  When every probed entry is in use (thousands of addresses at once in one
worker) a connection is not counted per client: ``smtpd_process_limit`` still
bounds it.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
import time
from collections.abc import Callable

from trimail.anvil import AUTH_WINDOW
from trimail.processes.board import SLOTS

ENTRIES = 4096  # per worker
PROBES = 16
RATE_WINDOW = 60.0  # seconds: Postfix's anvil_rate_time_unit
_AUTH_KEPT = AUTH_WINDOW  # seconds an entry with AUTH failures is kept

_KEY = 16  # bytes of the hash key at the start
_LIVE = struct.Struct(f"={SLOTS}B")  # which slots' tables are in use (a worker has run there: its windows count)
# address hash (0: never used), open sessions, rate window count and start, AUTH failures and their window's start
_ENTRY = struct.Struct("=QiIdId")
_HEADER = _KEY + _LIVE.size
_TABLE = ENTRIES * _ENTRY.size
_SIZE = _HEADER + SLOTS * _TABLE


class ClientBoard:
    """One process's handle: the master's (``create``, ``clear``) or a worker's
    (``ClientBoard(fd, slot)``: ``sessions``, ``arrived``, ``add``)."""

    def __init__(self, fd: int, slot: int | None = None) -> None:
        self.fd = fd
        self.memory = mmap.mmap(fd, _SIZE)
        self.slot = slot
        self.clock = time.monotonic  # the same clock in every process (trio's has an offset of its own)
        self._key = bytes(self.memory[:_KEY])
        if slot is not None:
            self.memory[_KEY + slot] = 1

    @classmethod
    def create(cls) -> ClientBoard:
        fd = os.memfd_create("trimail-clients", 0)
        os.ftruncate(fd, _SIZE)
        board = cls(fd)
        board.memory[:_KEY] = os.urandom(_KEY)
        board._key = bytes(board.memory[:_KEY])
        return board

    def clear(self, slot: int) -> None:
        """The worker in *slot* is gone, and its sessions with it (the master).  Its
        rate and AUTH failure windows stay and go on counting (a reload or a
        restart must not forgive a password guesser); the next worker in the slot
        takes the table over."""
        for start in range(_HEADER + slot * _TABLE, _HEADER + (slot + 1) * _TABLE, _ENTRY.size):
            key, sessions, *rest = _ENTRY.unpack_from(self.memory, start)
            if key and sessions:
                _ENTRY.pack_into(self.memory, start, key, 0, *rest)

    # -- a worker's side ---------------------------------------------------------

    def _hash(self, address: str) -> int:
        digest = hashlib.blake2b(address.encode("utf-8", "surrogateescape"), digest_size=8, key=self._key).digest()
        return int.from_bytes(digest, "little") or 1  # 0 marks an entry never used

    def _entries(self, slot: int, wanted: int) -> list[int]:
        """The offsets probed for *wanted* in *slot*'s table, up to a never-used entry."""
        base = _HEADER + slot * _TABLE
        offsets = []
        for probe in range(PROBES):
            offset = base + ((wanted + probe) % ENTRIES) * _ENTRY.size
            offsets.append(offset)
            if _ENTRY.unpack_from(self.memory, offset)[0] in (0, wanted):
                break
        return offsets

    def _own(self, wanted: int, now: float) -> int | None:
        """The offset of *wanted*'s entry in this worker's table, made if need be."""
        assert self.slot is not None
        free = None
        for offset in self._entries(self.slot, wanted):
            key, sessions, _, began, _, failed = _ENTRY.unpack_from(self.memory, offset)
            if key == wanted:
                return offset
            unused = sessions <= 0 and now - began >= RATE_WINDOW and now - failed >= _AUTH_KEPT
            if free is None and (key == 0 or unused):
                free = offset  # never used, or nobody's any more
        if free is not None:
            _ENTRY.pack_into(self.memory, free, wanted, 0, 0, now - RATE_WINDOW, 0, now - _AUTH_KEPT)
        return free

    def _everyone(self, wanted: int) -> list[tuple[int, int, float, int, float]]:
        """(open sessions, rate count and start, AUTH failures and start) of *wanted*
        in every table in use."""
        found = []
        for slot in self._live():
            for offset in self._entries(slot, wanted):
                key, *values = _ENTRY.unpack_from(self.memory, offset)
                if key == wanted:
                    found.append(tuple(values))
                    break
        return found

    def _live(self) -> list[int]:
        """The slots whose tables are in use (found with ``bytes.find``: a Python loop
        over all SLOTS flags cost a connection 7 us, with two of them set)."""
        flags = self.memory[_KEY:_HEADER]
        live = []
        slot = flags.find(1)
        while slot >= 0:
            live.append(slot)
            slot = flags.find(1, slot + 1)
        return live

    def _update(self, wanted: int, now: float, change: Callable[[list], None]) -> None:
        """Apply *change* (to the entry's fields after the key) to this worker's
        entry for the address hashed *wanted*."""
        offset = self._own(wanted, now)
        if offset is not None:
            key, *values = _ENTRY.unpack_from(self.memory, offset)
            change(values)
            _ENTRY.pack_into(self.memory, offset, key, *values)

    def sessions(self, address: str) -> int:
        """Open sessions of *address* in all workers."""
        return sum(max(0, entry[0]) for entry in self._everyone(self._hash(address)))

    def arrived(self, address: str) -> int:
        """Count one connection from *address*; the connections from it in all
        workers' windows, this one included."""
        now, wanted = self.clock(), self._hash(address)

        def count(values: list) -> None:
            if now - values[2] >= RATE_WINDOW:
                values[1], values[2] = 0, now
            values[1] += 1

        self._update(wanted, now, count)
        return sum(entry[1] for entry in self._everyone(wanted) if now - entry[2] < RATE_WINDOW)

    def add(self, address: str, change: int) -> None:
        """A session of *address* opened (+1) or closed (-1) in this worker."""
        def count(values: list) -> None:
            values[0] = max(0, values[0] + change)

        self._update(self._hash(address), self.clock(), count)

    def auth_failures(self, address: str, window: float) -> int:
        """Failed AUTH attempts of *address* in all workers' windows of *window* s."""
        now = self.clock()
        return sum(entry[3] for entry in self._everyone(self._hash(address)) if now - entry[4] < window)

    def auth_failed(self, address: str, window: float) -> None:
        """One more failed AUTH attempt of *address* in this worker."""
        now = self.clock()

        def count(values: list) -> None:
            if now - values[4] >= window:
                values[3], values[4] = 0, now
            values[3] += 1

        self._update(self._hash(address), now, count)
