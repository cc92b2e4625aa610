"""The session board: every smtpd worker's count of open sessions, in one page of
shared memory, so ``smtpd_process_limit`` and stress mode count the sessions of
all workers together (Postfix counts them in master(8) for all smtpd processes).

The master creates it (a memfd, inherited by every worker) and gives each worker
its own slot; a worker writes only its slot and reads the sum, so no lock is
needed (an aligned 8-byte store is atomic, and a sum that is one update behind
is as good as a count taken a moment earlier).  The master clears the slot of a
worker that died, whose sessions died with it.
"""

from __future__ import annotations

import mmap
import os
import struct

SLOTS = 256
_ALL = struct.Struct(f"={SLOTS}q")
_ONE = struct.Struct("=q")


class SessionBoard:
    def __init__(self, fd: int, slot: int | None = None) -> None:
        self.fd = fd
        self.memory = mmap.mmap(fd, _ALL.size)
        self.slot = slot
        self.mine = 0

    @classmethod
    def create(cls) -> SessionBoard:
        fd = os.memfd_create("trimail-sessions", 0)
        os.ftruncate(fd, _ALL.size)
        return cls(fd)

    def add(self, change: int) -> None:
        assert self.slot is not None
        self.mine += change
        _ONE.pack_into(self.memory, self.slot * 8, self.mine)

    def total(self) -> int:
        return sum(_ALL.unpack_from(self.memory))

    def clear(self, slot: int) -> None:
        _ONE.pack_into(self.memory, slot * 8, 0)
