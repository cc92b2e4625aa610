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
