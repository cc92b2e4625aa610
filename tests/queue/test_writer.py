"""The group-commit writer keeps accepted mail (durable requests) apart from the
scheduler's bookkeeping, so no 250 waits for a long claim or a slice of records."""

from __future__ import annotations

import threading

import trio

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
    from trimail.queue.writer import InlineWriter

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
