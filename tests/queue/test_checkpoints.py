"""Checkpoints under load let the WAL start over although other processes keep
committing, and a writer thread never checkpoints inside a batch's COMMIT."""

from __future__ import annotations

import time

import trimail.queue.checkpoints as checkpoints_module
from trimail.queue.checkpoints import WalWatch, under_load
from trimail.queue.store import Store
from trimail.queue.writer import QueueWriter


def _grow(store: Store, number: int, size: int = 3000) -> None:
    store.db.execute("INSERT INTO queue_count (state, messages) VALUES (?, ?)", (f"s{number}" + "x" * size, number))


def _commit_row(store: Store, number: int) -> None:
    with store.transaction():
        _grow(store, number)


def _wal_frames_after_passive_with_a_commit_meanwhile(tmp_path, finish_with_restart: bool) -> int:
    """The WAL's frames after one more commit, when another process's transaction
    ran across the PASSIVE checkpoint (as an smtpd worker's or the qmgr's does
    under load)."""
    store, other = Store.open(tmp_path), Store.open(tmp_path)
    watch = WalWatch(other)
    try:
        for number in range(30):
            _commit_row(store, number)
        real = checkpoints_module.checkpoint

        def checkpoint(checkpointing: Store, mode: str) -> bool:
            if mode == "PASSIVE":  # the other's transaction begins before it, and commits after it
                other.db.execute("BEGIN IMMEDIATE")
                _grow(other, 100)
            complete = real(checkpointing, mode)
            if mode == "PASSIVE":
                other.db.execute("COMMIT")
            return complete and (mode != "PASSIVE" or finish_with_restart)

        checkpoints_module.checkpoint = checkpoint
        try:
            under_load(store)
        finally:
            checkpoints_module.checkpoint = real
        _commit_row(other, 101)
        return watch.pages
    finally:
        other.close()
        store.close()


def test_a_checkpoint_under_load_lets_the_next_commit_start_the_wal_over(tmp_path):
    """A transaction that began before the PASSIVE checkpoint finished appends after
    it, and so does every commit after that (the WAL was never all copied when one
    began).  The RESTART that follows the PASSIVE one copies those frames under the
    write lock, so the next commit writes the WAL from its start: a few frames, not
    the whole history."""
    with_restart = _wal_frames_after_passive_with_a_commit_meanwhile(tmp_path / "a", True)
    passive_only = _wal_frames_after_passive_with_a_commit_meanwhile(tmp_path / "b", False)
    assert passive_only > 30  # what serve did before: the WAL never started over
    assert 0 < with_restart <= 10  # one commit's frames


def test_a_checkpoint_under_load_never_waits_for_a_writer_holding_the_lock(tmp_path):
    """Another process in the middle of its commit: the PASSIVE part copies what is
    committed, the RESTART part does not wait for the lock (partial, tried again by
    the next commit past the limit), and the other's commit goes through."""
    store, other = Store.open(tmp_path), Store.open(tmp_path)
    try:
        for number in range(10):
            _commit_row(store, number)
        other.db.execute("BEGIN IMMEDIATE")
        _grow(other, 100)
        started = time.monotonic()
        assert under_load(store) is False
        assert time.monotonic() - started < 1.0  # the busy timeout is 30 s
        other.db.execute("COMMIT")
        assert under_load(store) is True
    finally:
        other.close()
        store.close()


async def test_the_writer_thread_checkpoints_after_its_batches_when_the_wal_is_past_the_limit(tmp_path, monkeypatch):
    """Its connection never checkpoints inside COMMIT (SQLite's automatic checkpoint
    is replaced); past the limit the thread checkpoints after the batch, and the WAL
    starts over instead of growing with every commit."""
    monkeypatch.setattr(checkpoints_module, "AUTOCHECKPOINT_PAGES", 8)
    modes: list[str] = []
    real = checkpoints_module.checkpoint
    monkeypatch.setattr(checkpoints_module, "checkpoint", lambda store, mode: modes.append(mode) or real(store, mode))
    async with QueueWriter(lambda: Store.open(tmp_path)) as writer:
        writer._checkpoint_idle = 3600.0  # only the size can make it checkpoint now
        sizes = []
        for number in range(40):
            await writer.run(_grow, number)
            sizes.append((tmp_path / "queue.db-wal").stat().st_size)
    assert modes[:2] == ["PASSIVE", "RESTART"]
    assert max(sizes) < 20 * (4096 + 24)  # started over each time past 8 pages, not 40 rows of 3 KB
