"""The smtpd worker's writer (queue.solo.SmtpdWriter): a message commits in the
event loop while its session is the worker's only one, and on the writer thread
whenever that could stall another session, race another request, or wait."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import trio

from trimail.queue import inline, solo
from trimail.queue.solo import SmtpdWriter
from trimail.queue.spool import Spool
from trimail.queue.store import NewMessage, Store


def _message(queue_id: str, spool: Spool | None = None) -> NewMessage:
    if spool is None:
        spool = Spool()
        spool.write(b"Subject: t\r\n\r\nbody\r\n")
    return NewMessage(id=queue_id, sender="a@example.org", recipients=["b@example.net"], content=spool)


def _queued(directory) -> set[str]:
    other = Store.open(directory)
    try:
        return {row[0] for row in other.db.execute("SELECT id FROM message")}
    finally:
        other.close()


def _insert_noting_thread(ran_in: dict[str, tuple]):
    """An insert that notes its thread, its connection's PRAGMA synchronous, the
    connection, and how many times that connection had fsynced its WAL before."""
    def insert(store: Store, message: NewMessage) -> None:
        synchronous = store.db.execute("PRAGMA synchronous").fetchone()[0]
        ran_in[message.id] = (threading.get_ident(), synchronous, store, store.wal_syncs)
        store.insert_message(message)
    return insert


async def test_a_lone_sessions_message_commits_fsynced_in_the_event_loop(tmp_path):
    """Alone: the commit runs in the loop's thread, with synchronous = NORMAL (1) and
    the WAL fsynced after the COMMIT (outside the write lock) before run() returns,
    and is visible to another connection then; with other sessions open the same
    request goes to the writer thread, which fsyncs the same way."""
    loop_thread = threading.get_ident()
    ran_in: dict[str, tuple] = {}
    insert = _insert_noting_thread(ran_in)
    sessions = 1
    async with SmtpdWriter(lambda: Store.open(tmp_path)) as writer:
        writer.alone = lambda: sessions <= 1
        await writer.run(insert, _message("AAAA1"))
        thread, synchronous, store, syncs = ran_in["AAAA1"]
        assert (thread, synchronous) == (loop_thread, 1)
        assert store.wal_syncs == syncs + 1
        assert _queued(tmp_path) == {"AAAA1"}
        sessions = 2
        await writer.run(insert, _message("AAAA2"))
        thread, synchronous, store, syncs = ran_in["AAAA2"]
        assert thread != loop_thread and synchronous == 1
        assert store.wal_syncs == syncs + 1
    assert _queued(tmp_path) == {"AAAA1", "AAAA2"}


async def test_a_commit_goes_to_the_thread_when_another_process_holds_the_lock(tmp_path):
    """The loop never waits for SQLite's write lock: while another connection (the
    other smtpd worker, the qmgr) holds it, the lone session's commit is handed to
    the thread, whose busy handler waits; the loop keeps running meanwhile."""
    loop_thread = threading.get_ident()
    ran_in: dict[str, tuple] = {}
    insert = _insert_noting_thread(ran_in)
    other = Store.open(tmp_path)
    async with SmtpdWriter(lambda: Store.open(tmp_path, busy_timeout=5.0)) as writer:
        writer.alone = lambda: True
        other.db.execute("BEGIN IMMEDIATE")
        ticks = 0
        async with trio.open_nursery() as nursery:
            async def submit() -> None:
                await writer.run(insert, _message("BBBB1"))
                nursery.cancel_scope.cancel()

            nursery.start_soon(submit)
            with trio.fail_after(5):
                while ticks < 20:  # the loop runs while the commit waits for the lock
                    await trio.sleep(0.005)
                    ticks += 1
            assert "BBBB1" not in ran_in or ran_in["BBBB1"][0] != loop_thread
            other.db.execute("COMMIT")
            with trio.fail_after(5):
                await trio.sleep_forever()
    other.close()
    assert ran_in["BBBB1"][0] != loop_thread
    assert _queued(tmp_path) == {"BBBB1"}


async def test_a_shielded_commit_is_seen_through_when_its_caller_is_cancelled(tmp_path):
    """run_shielded (the end of DATA, whose 250 follows the commit): under a cancelled
    scope a commit in the loop runs and answers (it has no wait a cancellation could
    end); cancelled while its commit waits on the thread for another process's lock,
    the caller still gets the commit's answer once it is done."""
    other = Store.open(tmp_path)
    async with SmtpdWriter(lambda: Store.open(tmp_path, busy_timeout=5.0)) as writer:
        writer.alone = lambda: True
        answers = []
        with trio.CancelScope() as scope:
            scope.cancel()
            answers.append(await writer.run_shielded(lambda store, m: store.insert_message(m) or "in loop",
                                                     _message("CCCC1")))
        assert answers == ["in loop"] and _queued(tmp_path) == {"CCCC1"}

        other.db.execute("BEGIN IMMEDIATE")

        async def submit(task_status=trio.TASK_STATUS_IGNORED) -> None:
            with trio.CancelScope() as caller:
                task_status.started(caller)
                answers.append(await writer.run_shielded(lambda store, m: store.insert_message(m) or "on thread",
                                                         _message("CCCC2")))

        async with trio.open_nursery() as nursery:
            caller = await nursery.start(submit)
            with trio.fail_after(5):
                while not writer._with_thread:  # handed to the thread, which waits for the lock
                    await trio.sleep(0.001)
            caller.cancel()
            await trio.lowlevel.checkpoint()
            assert answers == ["in loop"]  # still waiting, not cancelled away
            other.db.execute("COMMIT")
    other.close()
    assert answers == ["in loop", "on thread"]
    assert _queued(tmp_path) == {"CCCC1", "CCCC2"}


async def test_a_commit_never_overtakes_one_that_is_with_the_thread(tmp_path):
    """A request made while an earlier one is still with the thread goes to the
    thread too, behind it: commits happen in the order they were asked for."""
    loop_thread = threading.get_ident()
    order: list[str] = []
    release = threading.Event()

    def first(store: Store) -> None:
        release.wait(5)
        order.append("first")

    def second(store: Store) -> int:
        order.append("second")
        return threading.get_ident()

    alone = False
    async with SmtpdWriter(lambda: Store.open(tmp_path)) as writer:
        writer.alone = lambda: alone
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run, first)
            await trio.testing.wait_all_tasks_blocked()
            alone = True  # the other session ended: its commit is still on the thread
            result: list[int] = []

            async def later() -> None:
                result.append(await writer.run(second))

            nursery.start_soon(later)
            await trio.testing.wait_all_tasks_blocked()
            assert order == []
            release.set()
    assert order == ["first", "second"]
    assert result[0] != loop_thread


async def test_large_content_and_a_slow_disk_keep_commits_on_the_thread(tmp_path, monkeypatch):
    """The loop never commits content over INLINE_CONTENT nor reads a spool file, and
    after one commit in the loop slower
    than inline.SLOW it leaves the next ones to the thread for SLOW_BACKOFF."""
    loop_thread = threading.get_ident()
    ran_in: dict[str, tuple] = {}
    insert = _insert_noting_thread(ran_in)
    spilled = Spool(tmp_path, memory_limit=8)
    spilled.write(b"Subject: big\r\n\r\n" + b"x" * 100 + b"\r\n")
    await spilled.finish()
    assert not spilled.in_memory
    monkeypatch.setattr(inline, "SLOW", 0.02)

    def slow_insert(store: Store, message: NewMessage) -> None:
        time.sleep(0.05)  # a disk that takes 50 ms to sync
        insert(store, message)

    large = Spool(memory_limit=2 * solo.INLINE_CONTENT)  # (the default keeps no more than that in memory)
    large.write(b"Subject: large\r\n\r\n" + b"x" * solo.INLINE_CONTENT + b"\r\n")
    assert large.in_memory

    async with SmtpdWriter(lambda: Store.open(tmp_path)) as writer:
        writer.alone = lambda: True
        await writer.run(insert, _message("CCCC0", large))
        await writer.run(insert, _message("CCCC1", spilled))
        await writer.run(slow_insert, _message("CCCC2"))
        await writer.run(insert, _message("CCCC3"))
    assert ran_in["CCCC0"][0] != loop_thread
    assert ran_in["CCCC1"][0] != loop_thread
    assert ran_in["CCCC2"][0] == loop_thread
    assert ran_in["CCCC3"][0] != loop_thread
    assert _queued(tmp_path) == {"CCCC0", "CCCC1", "CCCC2", "CCCC3"}


def _broken(store: Store, message: NewMessage) -> None:
    store.insert_message(message)
    raise ValueError("bad")


def _unbindable(queue_id: str) -> NewMessage:
    message = _message(queue_id)
    message.sender = "\ud800@example.org"  # a lone surrogate: not UTF-8, SQLite cannot take it
    return message


@pytest.mark.parametrize(("request_fn", "make", "error"), [
    (_broken, _message, ValueError),  # the request itself raises
    (Store.insert_message, _unbindable, UnicodeEncodeError),  # SQLite refuses a value of the new message
], ids=["request-raises", "sqlite-refuses"])
async def test_a_failing_commit_in_the_loop_is_the_callers_error_and_leaves_no_transaction(tmp_path, request_fn,
                                                                                            make, error):
    """A request that fails is rolled back and its caller gets the error; nothing of
    it is queued and the connection is usable for the next commit."""
    async with SmtpdWriter(lambda: Store.open(tmp_path)) as writer:
        writer.alone = lambda: True
        with pytest.raises(error):
            await writer.run(request_fn, make("DDDD1"))
        assert writer._inline is not None and writer._inline.db.getautocommit()
        await writer.run(Store.insert_message, _message("DDDD2"))
    assert _queued(tmp_path) == {"DDDD2"}


async def note_gaps(gaps: list[float]) -> None:
    """Tick every 10 ms until cancelled, noting each gap: how long the loop stopped."""
    last = trio.current_time()
    while True:
        await trio.sleep(0.01)
        gaps.append(trio.current_time() - last)
        last = trio.current_time()


def _hold_wal_index_read_locks(directory, seconds: float) -> subprocess.Popen[bytes]:
    """Another process holding every read lock of the WAL index (as one running WAL
    recovery does), for *seconds*; returns once they are held."""
    script = ("import fcntl, os, sys, time\n"
              "fd = os.open(sys.argv[1], os.O_RDWR)\n"
              "fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 5, 123)\n"
              "print('held', flush=True)\n"
              "time.sleep(float(sys.argv[2]))\n")
    holder = subprocess.Popen([sys.executable, "-c", script, str(directory / "queue.db-shm"), str(seconds)],
                              stdout=subprocess.PIPE)
    assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
    return holder


async def test_a_begin_that_waited_for_the_wal_index_sends_the_next_commits_to_the_thread(tmp_path):
    """SQLite retries the WAL index's read locks by itself, sleeping, although the
    busy timeout is 0: a BEGIN in the loop while another process holds them stops
    the loop until they are free (or ~10 s).  That happens once: the next commits
    go to the thread for SLOW_BACKOFF, and the loop runs while they wait."""
    loop_thread = threading.get_ident()
    ran_in: dict[str, tuple] = {}
    insert = _insert_noting_thread(ran_in)
    async with SmtpdWriter(lambda: Store.open(tmp_path)) as writer:
        writer.alone = lambda: True
        await writer.run(insert, _message("EEEE0"))  # the WAL and its index exist
        holder = _hold_wal_index_read_locks(tmp_path, 1.0)
        started = time.monotonic()
        await writer.run(insert, _message("EEEE1"))  # waits in the loop, once
        assert time.monotonic() - started > 0.5
        holder.wait()
        holder = _hold_wal_index_read_locks(tmp_path, 1.0)
        gaps: list[float] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(note_gaps, gaps)
            with trio.fail_after(15):
                await writer.run(insert, _message("EEEE2"))
            nursery.cancel_scope.cancel()
        holder.wait()
    assert ran_in["EEEE0"][0] == ran_in["EEEE1"][0] == loop_thread
    assert ran_in["EEEE2"][0] != loop_thread
    assert len(gaps) > 20 and max(gaps) < 0.3, max(gaps)
    assert _queued(tmp_path) == {"EEEE0", "EEEE1", "EEEE2"}
