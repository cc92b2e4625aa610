"""When serve's writers copy the WAL into the database (checkpoints), and how.

SQLite checkpoints by itself inside the COMMIT that leaves the WAL past
``wal_autocheckpoint`` pages (1,000): on a writer thread that delayed the batch's
``250`` replies by the checkpoint's copy and its two fsyncs (the WAL's, the
database's).  So no writing connection of serve checkpoints by itself: a WAL hook
(``WalWatch`` on the writer thread's connection, ``queue.inline.open_inline`` on the
event loops') notes the WAL's size, and the writer thread checkpoints after it has
answered the batch (``queue.writer``):

- **under load** (the WAL past ``AUTOCHECKPOINT_PAGES``), ``under_load``: first
  PASSIVE, which takes no lock, so no process's commit waits for its copy and
  fsyncs.  But while it runs the other processes go on appending, and a writer
  writes the WAL from its start again only when the WAL was all copied as its
  transaction began.  With two smtpd workers and the qmgr committing in turn, that
  was almost never: the WAL grew past the limit, stayed there, and every commit
  asked for another checkpoint (1,600-1,750 checkpoints, each with its two fsyncs, for
  3,000 messages of one client end to end, one message per connection).  So a
  RESTART follows the PASSIVE one (unless another process's checkpoint was under
  way): it takes the write lock for the few frames appended meanwhile (usually none,
  and then no fsync either) and checks that no reader is in the WAL; the next
  writer then starts the WAL over, at the start of the file.  Neither waits: a busy
  write lock or a reader makes it partial, and the next commit past the limit asks
  again.  Measured (same load, 4 alternating pairs): 1,600-1,750 -> about 300
  checkpoints, CPU per message of all processes 0.06-0.18 ms lower in 4 of 4 pairs,
  the rate higher in 3 of 4.
- **when idle** (``queue.writer.CHECKPOINT_IDLE``), TRUNCATE: the WAL is emptied, so
  it does not stay large and a copy of the queue directory copies less.

Parameters: none.
"""

from __future__ import annotations

import logging
from typing import Literal

import apsw

from trimail.queue.store import Store

log = logging.getLogger("trimail.queue")

AUTOCHECKPOINT_PAGES = 1000  # SQLite's default wal_autocheckpoint


class WalWatch:
    """Replaces SQLite's automatic checkpoints on *store*'s connection: notes the
    WAL's size after each of its commits, for ``after_batch``."""

    __slots__ = ("pages",)

    def __init__(self, store: Store) -> None:
        self.pages = 0
        store.db.set_wal_hook(self._committed)

    def _committed(self, connection: apsw.Connection, name: str, pages: int) -> int:
        del connection, name
        self.pages = pages
        return apsw.SQLITE_OK

    def after_batch(self, store: Store) -> None:
        """After the thread answered a batch: ``under_load`` when the batch's commit
        left the WAL past ``AUTOCHECKPOINT_PAGES`` (a later commit that finds it
        still past asks again)."""
        if self.pages >= AUTOCHECKPOINT_PAGES:
            self.pages = 0
            under_load(store)


def checkpoint(store: Store, mode: Literal["PASSIVE", "RESTART", "TRUNCATE"]) -> bool:
    """One checkpoint (``Database.checkpoint``); whether it finished (False: another
    checkpoint was under way, readers or a writer kept a RESTART or TRUNCATE one from
    finishing, or it failed, which is logged)."""
    try:
        complete, frames, done = store.checkpoint(mode)
        log.debug("queue checkpoint (%s): %d of %d WAL frames", mode.lower(), done, frames)
        return complete
    except apsw.Error as exc:
        log.warning("queue checkpoint failed: %s", exc)
        return False


def under_load(store: Store) -> bool:
    """The WAL has grown past its limit: copy it without holding up anyone's commit,
    then have the next writer start it over (see the module's docstring).  Whether
    it will."""
    return checkpoint(store, "PASSIVE") and checkpoint(store, "RESTART")
