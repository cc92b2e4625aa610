"""The qmgr worker's bookkeeping runs in its event loop (queue.inline.BookkeepingWriter);
a BEGIN there that SQLite itself keeps waiting (another process holds the WAL
index's read locks, as WAL recovery does) stops that loop once, not for every
request: the next bookkeeping and small reads go to the threads for SLOW_BACKOFF,
in the order they were asked for."""

from __future__ import annotations

import threading
import time
from functools import partial

import trio
import trio.testing

from tests.queue.test_solo import _hold_wal_index_read_locks, note_gaps
from tests.queue.test_store import message
from trimail.queue.inline import BookkeepingWriter
from trimail.queue.store import Store


async def test_bookkeeping_after_a_begin_that_waited_for_the_wal_index_goes_to_the_thread_in_turn(tmp_path):
    loop_thread = threading.get_ident()
    ran: list[tuple[str, int]] = []

    def note(store: Store, name: str) -> str:
        store.db.execute("UPDATE queue_count SET messages = messages WHERE state = 'none'")  # a write
        ran.append((name, threading.get_ident()))
        return name

    async with BookkeepingWriter(lambda: Store.open(tmp_path)) as writer:
        await writer.run(Store.insert_message, message())  # durable: the thread; the WAL and its index exist
        assert await writer.run(note, "before", durable=False) == "before"
        holder = _hold_wal_index_read_locks(tmp_path, 1.0)
        started = time.monotonic()
        await writer.run(note, "stalled", durable=False)  # waits in the loop, once
        assert time.monotonic() - started > 0.5
        holder.wait()

        holder = _hold_wal_index_read_locks(tmp_path, 1.0)
        gaps: list[float] = []
        answers: list[str] = []

        async def submit(name: str) -> None:
            answers.append(await writer.run(note, name, durable=False))

        with trio.fail_after(15):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(note_gaps, gaps)
                for name in ("a", "b", "c"):
                    nursery.start_soon(submit, name)
                    await trio.testing.wait_all_tasks_blocked()  # asked for in this order
                assert await writer.read(Store.counts, small=True) == {"incoming": 1}
                while len(answers) < 3:
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
        holder.wait()
    threads = dict(ran)
    assert threads["before"] == threads["stalled"] == loop_thread
    assert [name for name, _ in ran[2:]] == ["a", "b", "c"]  # committed in the order asked
    assert sorted(answers) == ["a", "b", "c"]
    assert all(threads[name] != loop_thread for name in "abc")
    assert len(gaps) > 20 and max(gaps) < 0.3, max(gaps)


async def test_bookkeeping_after_the_back_off_ends_still_waits_for_what_the_thread_has(tmp_path):
    """Requests handed to the thread while backing off stay ahead of later ones: when
    the back-off ends before the thread ran them (it is busy), a new request must not
    run in the loop before them."""
    ran: list[str] = []
    holding, release = threading.Event(), threading.Event()

    def hold(store: Store) -> None:  # keeps the writer thread busy, without the write lock
        store.db.execute("COMMIT")  # (as while SQLite itself retries the WAL index's locks)
        holding.set()
        release.wait(10)
        store.db.execute("BEGIN IMMEDIATE")

    def note(store: Store, name: str) -> None:
        store.db.execute("UPDATE queue_count SET messages = messages WHERE state = 'none'")
        ran.append(name)

    async with BookkeepingWriter(lambda: Store.open(tmp_path)) as writer:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run, hold)
            assert await trio.to_thread.run_sync(holding.wait, 5)
            writer._stalls.until = trio.current_time() + 60  # backing off (what a stalled BEGIN sets)
            nursery.start_soon(partial(writer.run, note, "first", durable=False))
            with trio.fail_after(5):
                while writer._requests.qsize() < 1:  # handed to the thread, behind hold
                    await trio.sleep(0.001)
            writer._stalls.until = 0.0  # the back-off ends; the thread still has "first"
            nursery.start_soon(partial(writer.run, note, "second", durable=False))
            await trio.testing.wait_all_tasks_blocked()
            release.set()
    assert ran == ["first", "second"]
