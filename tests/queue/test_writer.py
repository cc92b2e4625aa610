"""The group-commit writer keeps accepted mail (durable requests) apart from the
scheduler's bookkeeping, so no 250 waits for a long claim or a slice of records."""

from __future__ import annotations

import os
import threading

import apsw
import pytest
import trio
import trio.testing

from trimail.errors import StorageError
from trimail.queue.inline import BookkeepingWriter, InlineWriter
from trimail.queue.solo import SmtpdWriter
from trimail.queue.store import Store
from trimail.queue.writer import QueueWriter


async def test_accepted_mail_commits_without_waiting_for_slow_bookkeeping_queued_beside_it(tmp_path):
    """A slow non-durable request (a big claim) and a durable one (a message being
    accepted) wait together: the durable one is committed and answered first."""
    holding, release_hold, release_slow = threading.Event(), threading.Event(), threading.Event()

    def hold(store: Store) -> None:  # keeps the writer busy while the other two queue up
        holding.set()
        release_hold.wait(10)

    def slow_bookkeeping(store: Store) -> str:
        release_slow.wait(10)  # finishes only once the durable request has been answered
        return "claimed"

    def accept(store: Store) -> str:
        store.db.execute("PRAGMA user_version")
        return "accepted"

    async with QueueWriter(lambda: Store.open(tmp_path)) as writer:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run, hold)
            assert await trio.to_thread.run_sync(holding.wait, 5)
            results: list[str] = []

            async def submit(fn, durable: bool) -> None:
                results.append(await writer.run(fn, durable=durable))

            nursery.start_soon(submit, slow_bookkeeping, False)
            with trio.fail_after(5):
                while writer._requests.qsize() < 1:
                    await trio.sleep(0.001)
            nursery.start_soon(submit, accept, True)
            with trio.fail_after(5):
                while writer._requests.qsize() < 2:
                    await trio.sleep(0.001)
            release_hold.set()
            try:
                with trio.fail_after(3):
                    while "accepted" not in results:
                        await trio.sleep(0.001)
            finally:
                release_slow.set()
        assert results == ["accepted", "claimed"]


# -- a test queue's writer: in the event loop, no thread ------------------------------

async def test_a_test_mta_commits_in_its_event_loop_without_a_writer_thread():
    """trimail.testing's queue is never fsynced nor shared, so its commits run where
    they are asked for (InlineWriter): starting a test MTA starts no writer thread,
    and a message is still committed and captured."""
    import smtplib

    from trimail.testing.mta import open_test_mta

    before = {thread.ident for thread in threading.enumerate()}
    async with open_test_mta() as mta:
        started = [thread.name for thread in threading.enumerate() if thread.ident not in before]
        assert "trimail-queue-writer" not in started

        def send() -> None:
            with smtplib.SMTP(mta.host, mta.port, timeout=10) as client:
                client.sendmail("a@example.org", ["b@example.com"], "Subject: inline\r\n\r\nx\r\n")

        await trio.to_thread.run_sync(send)
        [message] = await mta.wait_for(subject="inline")
        counts = await mta.server.writer.read(lambda store: store.counts())
        assert sum(counts.values()) == 1, counts  # committed: a reading connection sees it


async def test_the_inline_writer_maps_failures_and_refuses_work_after_it_closed(tmp_path):
    from trimail.errors import StorageError
    def broken(store: Store) -> None:
        store.db.execute("SELECT * FROM no_such_table")

    async with InlineWriter(lambda: Store.open(tmp_path), readers_at_start=0) as writer:
        assert await writer.run(lambda store: store.db.execute("PRAGMA user_version").fetchone()[0]) > 0
        try:
            await writer.run(broken)
        except StorageError as exc:
            assert "no_such_table" in str(exc)
        else:
            raise AssertionError("a failing request must raise StorageError")
    try:
        await writer.run(lambda store: None)
    except StorageError as exc:
        assert "stopped" in str(exc)
    else:
        raise AssertionError("a closed writer must refuse")


# -- the qmgr worker's writer (BookkeepingWriter): bookkeeping in the event loop ------

def _wal_size(directory) -> int:
    wal = directory / "queue.db-wal"
    return wal.stat().st_size if wal.exists() else 0


async def test_bookkeeping_runs_in_the_event_loop_when_the_write_lock_is_free(tmp_path):
    """With BookkeepingWriter, a non-durable request runs in the caller's thread
    (no hand-over) and is committed: another connection sees it at once.  Durable
    requests (accepted mail) still go to the writer thread, which fsyncs."""
    loop_thread = threading.get_ident()
    seen: dict[str, int] = {}

    def note(store: Store, name: str) -> None:
        seen[name] = threading.get_ident()
        store.db.execute("PRAGMA user_version")
        store.db.execute("INSERT INTO queue_count (state, messages) VALUES (?, 1)"
                         " ON CONFLICT (state) DO UPDATE SET messages = messages + 1", (name,))

    async with BookkeepingWriter(lambda: Store.open(tmp_path)) as writer:
        await writer.run(note, "hold", durable=False)
        await writer.run(note, "incoming", durable=True)
    assert seen["hold"] == loop_thread
    assert seen["incoming"] != loop_thread
    other = Store.open(tmp_path)
    try:
        rows = dict(other.db.execute("SELECT state, messages FROM queue_count WHERE state IN ('hold', 'incoming')"))
    finally:
        other.close()
    assert rows == {"hold": 1, "incoming": 1}


async def test_the_qmgr_reads_small_content_in_the_event_loop_even_while_the_write_lock_is_held(tmp_path):
    """BookkeepingWriter.read(small=True) (the qmgr's pieces of content up to
    SMALL_READ) runs in the caller's thread, on the inline connection, and a reader
    needs no lock: another process holding the write lock delays nothing.  Other
    reads go to a reading thread."""
    loop_thread = threading.get_ident()

    def count(store: Store) -> tuple[int, int]:
        return threading.get_ident(), store.db.execute("SELECT count(*) FROM message").fetchone()[0]

    other = Store.open(tmp_path)
    async with BookkeepingWriter(lambda: Store.open(tmp_path, busy_timeout=2.0)) as writer:
        other.db.execute("BEGIN IMMEDIATE")  # the lock, held elsewhere
        try:
            with trio.fail_after(1):
                small = await writer.read(count, small=True)
                large = await writer.read(count)
        finally:
            other.db.execute("COMMIT")
    other.close()
    assert small == (loop_thread, 0)
    assert large[0] != loop_thread and large[1] == 0


async def test_a_small_read_that_finds_the_wal_index_busy_goes_to_a_reading_thread(tmp_path):
    """The inline connection never waits inside SQLite (busy timeout 0): a read it
    cannot begin at once is done by a reading thread, not failed."""
    loop_thread = threading.get_ident()
    tries: list[int] = []

    def busy_once(store: Store) -> int:
        tries.append(threading.get_ident())
        if len(tries) == 1:
            raise apsw.BusyError("database is locked")
        return threading.get_ident()

    async with BookkeepingWriter(lambda: Store.open(tmp_path)) as writer:
        ran_in = await writer.read(busy_once, small=True)
        assert writer._inline is not None and writer._inline.db.getautocommit()  # its snapshot was ended
    assert tries[0] == loop_thread and ran_in != loop_thread


async def test_bookkeeping_waits_in_the_event_loop_while_another_process_holds_the_lock(tmp_path):
    """When another writer (an smtpd worker's commit) holds SQLite's write lock, the
    request waits for it in the event loop without stopping the loop (no busy wait
    inside SQLite, no hand-over to the thread, whose two hops and busy handler cost
    more than the wait), and runs there once the lock is free."""
    loop_thread = threading.get_ident()
    ran_in: list[int] = []

    def bookkeeping(store: Store) -> str:
        ran_in.append(threading.get_ident())
        return "done"

    other = Store.open(tmp_path)
    async with BookkeepingWriter(lambda: Store.open(tmp_path, busy_timeout=2.0)) as writer:
        other.db.execute("BEGIN IMMEDIATE")  # the lock, held elsewhere
        result: list[str] = []
        gaps: list[float] = []
        async with trio.open_nursery() as nursery:
            async def submit() -> None:
                result.append(await writer.run(bookkeeping, durable=False))

            async def tick() -> None:  # the loop's responsiveness while the request waits
                last = trio.current_time()
                while True:
                    await trio.sleep(0.001)
                    now = trio.current_time()
                    gaps.append(now - last)
                    last = now

            nursery.start_soon(tick)
            nursery.start_soon(submit)
            await trio.sleep(0.3)
            assert result == [] and len(writer._waiting) == 1
            other.db.execute("COMMIT")
            with trio.fail_after(5):
                while not result:
                    await trio.sleep(0.001)
            nursery.cancel_scope.cancel()
        assert result == ["done"]
        assert ran_in == [loop_thread]
        assert writer._requests.qsize() == 0 and writer.stats.requests == 1  # the thread ran nothing
        # waiting for the lock inside SQLite would have stopped the loop for the busy timeout (2 s)
        assert max(gaps) < 0.5, max(gaps)
    other.close()


async def test_bookkeeping_fails_when_another_process_holds_the_lock_past_the_busy_timeout(tmp_path):
    """A lock held past queue_busy_timeout fails the waiting bookkeeping with a
    StorageError (the round or the recording is tried again later), as a wait
    inside SQLite would; later bookkeeping runs once the lock is free."""
    other = Store.open(tmp_path)
    async with BookkeepingWriter(lambda: Store.open(tmp_path, busy_timeout=0.2)) as writer:
        other.db.execute("BEGIN IMMEDIATE")
        with trio.fail_after(5), pytest.raises(StorageError, match="busy timeout"):
            await writer.run(lambda store: "claimed", durable=False)
        assert not writer._waiting
        other.db.execute("COMMIT")
        with trio.fail_after(5):
            assert await writer.run(lambda store: "recorded", durable=False) == "recorded"
    other.close()


async def test_bookkeeping_waiting_for_the_lock_fails_when_the_writer_stops(tmp_path):
    """A stop while bookkeeping waits for another process's lock answers it with
    an error at once: nobody waits for a lock that the closed connection will never
    take."""
    other = Store.open(tmp_path)
    failures: list[BaseException] = []
    async with trio.open_nursery() as nursery:
        async with BookkeepingWriter(lambda: Store.open(tmp_path, busy_timeout=30.0)) as writer:
            other.db.execute("BEGIN IMMEDIATE")

            async def submit() -> None:
                try:
                    await writer.run(lambda store: "claimed", durable=False)
                except StorageError as exc:
                    failures.append(exc)

            nursery.start_soon(submit)
            with trio.fail_after(5):
                while not writer._waiting:
                    await trio.sleep(0.001)
        with trio.fail_after(5):
            while not failures:
                await trio.sleep(0.001)
    other.db.execute("COMMIT")
    other.close()
    assert "stopped" in str(failures[0])


async def test_inline_commits_past_the_autocheckpoint_size_are_checkpointed_by_the_writer_thread(
        tmp_path, monkeypatch):
    """The inline connection never checkpoints by itself (a checkpoint fsyncs the
    database in the event loop): once its commits grow the WAL past the automatic
    checkpoint size, the thread checkpoints at once, without waiting to be idle."""
    import trimail.queue.checkpoints as checkpoints_module
    import trimail.queue.inline as inline_module

    monkeypatch.setattr(inline_module, "AUTOCHECKPOINT_PAGES", 8)
    checkpoints: list[str] = []
    real = checkpoints_module.checkpoint
    monkeypatch.setattr(checkpoints_module, "checkpoint",
                        lambda store, mode: checkpoints.append(mode) or real(store, mode))

    def grow(store: Store, number: int) -> None:
        store.db.execute("INSERT INTO queue_count (state, messages) VALUES (?, ?)", (f"s{number}" + "x" * 3000, number))

    async with BookkeepingWriter(lambda: Store.open(tmp_path)) as writer:
        writer._checkpoint_idle = 3600.0  # only the size can make it checkpoint now
        for number in range(20):
            await writer.run(grow, number, durable=False)
        assert writer.stats.requests == 20
        with trio.fail_after(5):
            while not checkpoints:
                await trio.sleep(0.005)
        assert checkpoints[0] == "PASSIVE"  # see the next test


def test_a_passive_checkpoint_runs_while_another_connection_writes_and_a_truncating_one_cannot(tmp_path):
    """The checkpoint the writer makes under load (the WAL past its size) copies the
    WAL without the write lock, so the other processes' commits (an smtpd worker's,
    and its client's 250) never wait for it; the one made when idle truncates the
    WAL and needs the lock, which it never waits for."""
    store, other = Store.open(tmp_path), Store.open(tmp_path)
    try:
        with store.transaction():
            for number in range(50):
                store.db.execute("INSERT INTO queue_count (state, messages) VALUES (?, ?)",
                                 (f"s{number}" + "x" * 1000, number))
        other.db.execute("BEGIN IMMEDIATE")  # another process in the middle of its commit
        other.db.execute("INSERT INTO queue_count (state, messages) VALUES ('pending', 1)")
        complete, frames, done = store.checkpoint("PASSIVE")
        assert complete and frames > 0 and done == frames  # copied while the other held the lock
        complete, _, _ = store.checkpoint("TRUNCATE")
        assert not complete  # the lock is the other's: not waited for
        other.db.execute("COMMIT")
        assert store.checkpoint("TRUNCATE")[0]
        assert _wal_size(tmp_path) == 0
    finally:
        other.close()
        store.close()


async def test_inline_commits_are_checkpointed_by_the_writer_thread_when_idle(tmp_path):
    """After inline commits, the thread checkpoints (and truncates the WAL) once it
    has been idle, as after its own commits."""
    def grow(store: Store, number: int) -> None:
        store.db.execute("INSERT INTO queue_count (state, messages) VALUES (?, ?)", (f"s{number}", number))

    async with BookkeepingWriter(lambda: Store.open(tmp_path)) as writer:
        writer._checkpoint_idle = 0.05
        for number in range(3):
            await writer.run(grow, number, durable=False)
        assert _wal_size(tmp_path) > 0
        with trio.fail_after(5):
            while _wal_size(tmp_path) != 0:  # idle: checkpointed
                await trio.sleep(0.005)


async def test_bookkeeping_never_overtakes_bookkeeping_waiting_for_the_lock(tmp_path):
    """A request that waits because the lock was busy is committed before any later
    bookkeeping of the same loop, even one made while the lock is free: the last job
    of a message must see the outcomes its other jobs recorded, or a recipient still
    pending there is delivered again (found by the test bed: messages delivered
    twice)."""
    order: list[str] = []
    holding, release_hold = threading.Event(), threading.Event()

    def hold(store: Store) -> None:  # accepted mail being committed: the thread holds the lock
        holding.set()
        release_hold.wait(10)

    def record(store: Store, name: str) -> None:
        order.append(name)

    # one request per slice, and the lock left free for 0.3 s after a slice while more
    # bookkeeping waits: "second" waits while nobody holds the lock
    async with BookkeepingWriter(lambda: Store.open(tmp_path), max_batch=1, share_lock=0.3) as writer:
        answered: list[str] = []

        async def submit(name: str) -> None:
            await writer.run(record, name, durable=False)
            answered.append(name)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run, hold)
            assert await trio.to_thread.run_sync(holding.wait, 5)
            for name in ("first", "second"):  # both wait (the lock is busy), in turn
                nursery.start_soon(submit, name)
                with trio.fail_after(5):
                    while len(writer._waiting) < 1 + (name == "second"):
                        await trio.sleep(0.001)
            release_hold.set()
            with trio.fail_after(5):
                while not answered:  # "first" committed; the thread now leaves the lock free
                    await trio.sleep(0.001)
            nursery.start_soon(submit, "third")
    assert order == ["first", "second", "third"]


@pytest.mark.parametrize("writer_class", [BookkeepingWriter, InlineWriter])
async def test_bookkeeping_in_the_event_loop_runs_in_the_order_it_was_asked_for(tmp_path, writer_class):
    """A request that runs at once runs before run() yields: trio then schedules the
    waiting tasks in any order, and a later request (the last job of a message,
    finishing it) ran before an earlier one (another job's outcomes), which made
    the finish see recipients still pending (the test bed: two DSNs for one
    message)."""
    asked: list[int] = []
    ran: list[int] = []

    def record(store: Store, number: int) -> None:
        ran.append(number)

    async with writer_class(lambda: Store.open(tmp_path)) as writer:
        async def job(number: int) -> None:
            await trio.lowlevel.checkpoint()  # every job is scheduled, then asks in turn
            asked.append(number)
            await writer.run(record, number, durable=False)

        for _ in range(20):
            async with trio.open_nursery() as nursery:
                for number in range(20):
                    nursery.start_soon(job, number)
    assert ran == asked


async def test_an_idle_checkpoint_that_a_reader_kept_from_finishing_is_tried_again(tmp_path):
    """A reader holding an old snapshot keeps the idle checkpoint from truncating
    the WAL; once it is gone, the next idle period finishes the job without any new
    commit (the WAL stayed at its peak size, 435 MB in a red-team run, until new
    mail arrived)."""
    reader = Store.open(tmp_path, readonly=False)
    async with QueueWriter(lambda: Store.open(tmp_path)) as writer:
        writer._checkpoint_idle = 0.05
        await writer.run(lambda store: store.db.execute("PRAGMA user_version").fetchone())
        with reader.read_snapshot():
            reader.db.execute("SELECT count(*) FROM message").fetchone()  # the snapshot is taken
            await writer.run(lambda store: store.db.execute(
                "INSERT INTO queue_count (state, messages) VALUES ('x', 1)"))
            await trio.sleep(0.3)  # idle checkpoints run and cannot truncate past the reader
            assert _wal_size(tmp_path) > 0
        with trio.fail_after(5):
            while _wal_size(tmp_path) != 0:
                await trio.sleep(0.01)
    reader.close()


async def test_the_writer_thread_does_not_preempt_on_wake_up_and_the_event_loop_keeps_its_policy(tmp_path):
    """The writer's thread runs SCHED_BATCH (no wake-up preemption of the event loop
    that holds the interpreter lock it needs: queue.sched.no_wakeup_preemption);
    the event loop's own thread keeps the policy it had."""
    before = os.sched_getscheduler(0)
    async with QueueWriter(lambda: Store.open(tmp_path)) as writer:
        assert writer._thread is not None and writer._thread.native_id is not None
        assert os.sched_getscheduler(writer._thread.native_id) == os.SCHED_BATCH
        assert await writer.run(lambda store: os.sched_getscheduler(0)) == os.SCHED_BATCH
        assert os.sched_getscheduler(0) == before


def _count(store: Store, number: int) -> int:
    store.db.execute("INSERT INTO queue_count (state, messages) VALUES (?, ?)", (f"s{number}", number))
    return number


async def test_the_writer_thread_serves_on_after_its_own_loop_fails(tmp_path, monkeypatch, caplog):
    """A fault of the thread's loop itself (a bug, no memory; not a request's own
    error) costs the requests it held a temporary error, and the writer serves
    again: a dead writer answered every later message with an error until serve
    was restarted."""
    import trimail.queue.writer as writer_module

    monkeypatch.setattr(writer_module, "RECOVER_PAUSE", 0.01)
    faults = [RuntimeError("injected")]
    real = QueueWriter._wake

    def wake(self, token, batch):
        if faults:
            raise faults.pop()
        real(self, token, batch)

    monkeypatch.setattr(QueueWriter, "_wake", wake)
    async with QueueWriter(lambda: Store.open(tmp_path)) as writer:
        with trio.fail_after(5), pytest.raises(StorageError) as failed:
            await writer.run(_count, 1)
        assert failed.value.temporary
        with trio.fail_after(5):
            assert await writer.run(_count, 2) == 2
            assert await writer.run(_count, 3, durable=False) == 3
        assert writer._dead is None
    assert "queue writer failed: injected; serving again" in caplog.text


async def test_a_stop_the_writer_thread_took_before_its_loop_failed_still_stops_it(tmp_path, monkeypatch):
    """The loop fails while it handles the stop (its last checkpoint): the stop is put
    back, so the thread ends instead of serving on while serve waits for it."""
    import trimail.queue.writer as writer_module

    monkeypatch.setattr(writer_module, "RECOVER_PAUSE", 0.01)
    faults = [RuntimeError("injected at stop")]
    real = QueueWriter._checkpoint

    def checkpoint(self, store):
        if faults:
            raise faults.pop()
        return real(self, store)

    monkeypatch.setattr(QueueWriter, "_checkpoint", checkpoint)
    writer = QueueWriter(lambda: Store.open(tmp_path))
    await writer.__aenter__()
    await writer.run(_count, 1)
    writer._requests.put(writer_module._STOP)  # what __aexit__ puts first
    with trio.move_on_after(5):
        await writer._finished.wait()
    stopped = writer._finished.is_set()
    await writer.__aexit__()  # (its own stop ends the thread if the first one was lost)
    assert not faults  # the stop's checkpoint failed once ...
    assert stopped  # ... and the stop went through all the same


@pytest.mark.parametrize("writer_class", [QueueWriter, SmtpdWriter, BookkeepingWriter])
@pytest.mark.parametrize("durable", [True, False])
async def test_a_request_to_a_writer_that_is_closing_or_closed_fails_at_once(tmp_path, writer_class, durable):
    """A request that comes after the writer began to close gets a temporary error
    (its client a 4xx) instead of waiting for ever behind the thread's stop: in an
    experiment that ran sessions after their writer had closed, every commit waited
    so, and the worker did not stop on SIGTERM."""
    writer = writer_class(lambda: Store.open(tmp_path))
    await writer.__aenter__()
    assert await writer.run(_count, 1, durable=durable) == 1
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.__aexit__)
        await trio.testing.wait_all_tasks_blocked()  # __aexit__ has asked the thread to stop
        with trio.fail_after(5), pytest.raises(StorageError) as closing:
            await writer.run(_count, 2, durable=durable)
    with trio.fail_after(5), pytest.raises(StorageError) as closed:
        await writer.run(_count, 3, durable=durable)
    assert closing.value.temporary and closed.value.temporary
    store = Store.open(tmp_path)
    try:
        assert [row[0] for row in store.db.execute("SELECT state FROM queue_count")] == ["s1"]
    finally:
        store.close()
