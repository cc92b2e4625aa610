"""Room in the queue file system: ``QueueSpace`` is Postfix's queue_minfree check for
MAIL FROM: there must be more than max(queue_minfree, 1.5 * message_size_limit)
bytes free in the queue file system.  ``statvfs`` runs in a worker thread and its
answer is kept for a second, so a burst of MAIL commands costs one system call.  It
also admits each message at the end of DATA (``room_for``), which the check at MAIL
cannot do for sessions that all passed it while there was room: the queue must keep
some room once the message is in it (max(queue_minfree, ``ROOM_MARGIN``)), or the
queue manager could not record a delivery or remove delivered mail (see
``room_for``).  What the queue manager's space reserve lacks (``queue.reserve``:
released when the file system filled) counts as taken: those bytes are the queue
manager's.

Parameters (through the caller): queue_directory, queue_minfree, message_size_limit.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from trimail.errors import StorageError
from trimail.queue.database import DATABASE_NAME
from trimail.queue.reserve import missing_bytes

SPACE_MULTIPLIER = 1.5  # Postfix's smtpd_space_multf
SPACE_CACHE_SECONDS = 1.0
WAL_NAME = DATABASE_NAME + "-wal"
ROOM_MARGIN = 256 << 10  # bytes room_for keeps free after a message: the queue manager's records (64 WAL pages)
# room_for reads the free space again, for each message, when the last reading is within
# max(FRESH_BELOW, FRESH_BELOW_LIMITS * message_size_limit) bytes of the line: the other
# smtpd workers' commits since that reading (up to a second old) are not counted otherwise
FRESH_BELOW = 64 << 20
FRESH_BELOW_LIMITS = 16

log = logging.getLogger("trimail.smtpd")


class QueueSpace:
    """Is there room in the queue file system for one more message (Postfix's
    ``smtpd_check_queue``)?  Shared by the sessions of one serve.

    Room is the file system's free space and the free pages inside ``queue.db``
    (*unused*: bytes, read through the queue's reader): the database never
    shrinks, so after a backlog has left, the pages it took wait inside the file
    for new mail, and counting only ``statvfs`` refused all mail for good once a
    backlog had filled the file system.  A message's copy into the database (at
    the checkpoint) takes free pages first; its WAL frames need the file system."""

    def __init__(self, directory: str | os.PathLike[str], minfree: int, message_size_limit: int,
                 unused: Callable[[], Awaitable[int]] | None = None) -> None:
        self.directory = directory
        self.minfree = minfree
        self.message_size_limit = message_size_limit
        self._read_unused = unused
        self._free: int | None = None
        self._unused = 0  # bytes of free pages in the database at the last reading
        self._checked_at = -1e9
        self._warned_at = -1e9
        # bytes admitted by room_for whose commits have not ended (settled): of the
        # file system, and of the database's free pages
        self._in_flight = [0, 0]
        self._since = [0, 0]  # the same, admitted since the last reading or in flight when it was taken
        self._wal = 0  # the WAL's size at the last reading: what a checkpoint may still add to the database

    def _statvfs(self) -> int | None:
        try:
            stat = os.statvfs(self.directory)
        except OSError as exc:  # unknown: do not refuse mail because of the check itself
            log.warning("cannot find the free space of queue_directory %s: %s", self.directory,
                        exc.strerror or exc)
            return None
        try:
            self._wal = os.stat(os.path.join(self.directory, WAL_NAME)).st_size
        except OSError:  # no WAL (no connection open): nothing to copy
            self._wal = 0
        return stat.f_bavail * stat.f_frsize - missing_bytes(self.directory, stat)  # the qmgr's, not mail's

    async def free(self) -> int | None:
        """Free bytes of the file system for unprivileged writers (None when unknown),
        at most a second old; the database's free pages are read with them."""
        now = trio.current_time()
        if now - self._checked_at >= SPACE_CACHE_SECONDS:
            self._checked_at = now
            self._free = await trio.to_thread.run_sync(self._statvfs)
            try:
                self._unused = 0 if self._read_unused is None else await self._read_unused()
            except StorageError:  # counted as none: the queue's own errors are reported where they matter
                self._unused = 0
            self._since = list(self._in_flight)  # the commits the reading may not show yet
        return self._free

    async def _room(self) -> int | None:
        """``free`` less the WAL's size and what was admitted since the reading: the
        WAL reuses its file after a checkpoint, so the free space drops only when a
        checkpoint grows the database by the new pages the WAL holds (4.5 MB at
        once, measured), and the WAL's size bounds that."""
        free = await self.free()
        return None if free is None else free - self._wal - self._since[0]

    def _needs(self, size: int, spooled: bool) -> tuple[int, int]:
        """(bytes of the file system, bytes of the database's free pages) that a
        message of *size* bytes takes: its WAL frames, and its copy into the
        database, which takes free pages first.  *spooled* to a file, its WAL frames
        only: the file holds its size until the commit, and gives it back before the
        checkpoint copies the message."""
        if spooled:
            return size, 0
        from_pages = min(size, max(0, self._unused - self._since[1]))
        return 2 * size - from_pages, from_pages

    async def room_for(self, size: int, spooled: bool = False) -> tuple[int, int] | None:
        """At the end of DATA, just before the commit: whether the queue keeps
        max(queue_minfree, ``ROOM_MARGIN``) bytes free once this message of *size*
        bytes is in it, counted twice (the WAL takes it, and the checkpoint
        copies it into the database, which grows unless it has free pages).
        Without it, sessions that had all passed MAIL while there was room filled
        the file system to its last byte, and from then on every queue write failed,
        even the queue manager's record of a delivery and its removal of delivered
        mail: nothing moved until the file system grew.  The commits of this serve's
        other sessions still under way count as taken; near the line the free space
        is read again, not taken from a reading up to a second old.  A message
        *spooled* to a file in the queue's file system counts once (``_needs``).
        Admitted: what it counted as taken, for ``settled`` once its commit has
        ended, whatever the outcome; else None."""
        margin = max(self.minfree, ROOM_MARGIN)
        room = await self._room()
        taken = self._needs(size, spooled)
        near = max(FRESH_BELOW, FRESH_BELOW_LIMITS * self.message_size_limit)
        if room is not None and room < taken[0] + margin + near:
            self._checked_at = -1e9  # close to the line: what is free now
            room = await self._room()
            taken = self._needs(size, spooled)
        if room is not None and room < taken[0] + margin:
            now = trio.current_time()
            if now - self._warned_at >= SPACE_CACHE_SECONDS:
                self._warned_at = now
                log.warning("not enough free space in mail queue for a message of %d bytes: %d bytes of room "
                            "(free, less the WAL and the commits under way), %d needed", size, room,
                            taken[0] + margin)
            return None
        for counted in (self._in_flight, self._since):
            counted[0] += taken[0]
            counted[1] += taken[1]
        return taken

    def settled(self, taken: tuple[int, int]) -> None:
        """The commit of a message that ``room_for`` admitted, counting *taken*, has ended."""
        self._in_flight[0] -= taken[0]
        self._in_flight[1] -= taken[1]

    async def short(self) -> int | None:
        """The free bytes (the file system's and the database's free pages) when
        they are too few for a new message, else None (Postfix's rule; whether the
        file system has room for the message's WAL frames is ``room_for``'s)."""
        free = await self.free()
        if free is None:
            return None
        room = free + self._unused
        if room > self.minfree and room > SPACE_MULTIPLIER * self.message_size_limit:
            return None
        now = trio.current_time()
        if now - self._warned_at < SPACE_CACHE_SECONDS:
            return room  # one warning a second is enough, whatever the rate of MAIL commands
        self._warned_at = now
        log.warning("not enough free space in mail queue: %d bytes (%d of them free pages in the queue "
                    "database) < %g*message size limit (%d) or queue_minfree (%d)", room, self._unused,
                    SPACE_MULTIPLIER, self.message_size_limit, self.minfree)
        return room


def unused_bytes(store: Any) -> int:
    """The free pages inside the queue database, in bytes (for ``QueueSpace``, as a
    reader: ``PRAGMA freelist_count`` reads the database's header page)."""
    db = store.db
    return int(db.execute("PRAGMA freelist_count").fetchone()[0]) * int(db.execute("PRAGMA page_size").fetchone()[0])
