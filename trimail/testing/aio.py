"""``AsyncTestMTA``: the test MTA for asyncio and trio code; every wait is awaited.

    async with AsyncTestMTA() as mta:
        await aiosmtplib.send(mail, hostname=mta.host, port=mta.port)
        message = await mta.wait_for_one(subject="Welcome")

The MTA runs exactly as ``TestMTA`` runs it (trio in a background thread, its own
port and temporary directory, the same options, faults and assertions); only the
waiting differs.  ``TestMTA.wait_for`` blocks the calling thread: awaited from a
coroutine it stops the event loop, so mail the application sends from a background
task is never sent and the wait ends with "0 message(s) arrived".  Here a wait
sleeps on an event that the MTA's thread sets whenever something arrives
(``loop.call_soon_threadsafe`` under asyncio, the trio token under trio), so the
loop goes on running the application meanwhile.  Start and stop run in a worker
thread (``anyio.to_thread``), so ``async with`` does not stall the loop either.

Needs anyio (``pip install 'trimail[testing]'``); works under asyncio and trio,
whichever runs the coroutine (pytest-asyncio, anyio's pytest plugin, pytest-trio,
``asyncio.run``, ``trio.run``).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import Any, Self, TypeVar

import anyio
import sniffio

from trimail.testing.base import MTAAssertionError, Recording
from trimail.testing.content import CapturedMessage
from trimail.testing.mta import _DONE
from trimail.testing.observe import Attempt, Delivery
from trimail.testing.sync import TestMTA

T = TypeVar("T")


class _Waker:
    """Wakes one waiting coroutine from any thread: sets its event on its own loop."""

    def __init__(self) -> None:
        self.event = anyio.Event()
        if sniffio.current_async_library() == "trio":
            import trio

            self._soon: Callable[[Callable[[], object]], object] = trio.lowlevel.current_trio_token().run_sync_soon
        else:
            self._soon = asyncio.get_running_loop().call_soon_threadsafe

    def __call__(self) -> None:
        try:
            self._soon(self.event.set)
        except RuntimeError:  # that loop has ended (asyncio: closed; trio: RunFinishedError)
            pass


class _WakingCondition(Recording):
    """The test MTA's condition (``TestMTABase._lock``): whatever notifies the
    blocking waiters (a captured message, or anything else the base records) also
    wakes the awaiting ones."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake

    def notify(self, n: int = 1) -> None:
        super().notify(n)
        self._wake()

    def notify_all(self) -> None:
        super().notify_all()
        self._wake()


class AsyncTestMTA(TestMTA):
    """``async with AsyncTestMTA(**options) as mta:`` — options as ``TestMTA``'s."""

    __test__ = False

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._waiters: set[_Waker] = set()
        self._lock = _WakingCondition(self._wake_waiters)

    def _wake_waiters(self) -> None:  # called with self._lock held
        for waker in self._waiters:
            waker()

    # -- start and stop off the event loop ---------------------------------------------

    def start(self) -> AsyncTestMTA:
        super().start()
        if self.server is not None and self.server.addresses:  # the address it really listens on
            host = self.server.addresses[0].host
            if host not in ("0.0.0.0", "::", ""):  # a wildcard: keep the loopback address
                self.host = host
        return self

    async def __aenter__(self) -> Self:
        await anyio.to_thread.run_sync(self.start)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await anyio.to_thread.run_sync(self.stop)

    # -- waiting -----------------------------------------------------------------------

    async def _until_async(self, check: Callable[[], T | None], timeout: float, failure: Callable[[], str]) -> T:
        """Await *check*'s first non-None answer, asking again each time the MTA
        records something; MTAAssertionError with *failure*'s text after *timeout*."""
        with anyio.move_on_after(timeout):
            while True:
                waker = _Waker()
                with self._lock:  # registered before the check: an arrival in between still wakes us
                    self._waiters.add(waker)
                try:
                    found = check()
                    if found is not None:
                        return found
                    await waker.event.wait()
                finally:
                    with self._lock:
                        self._waiters.discard(waker)
        found = check()  # one that came with the deadline still counts
        if found is not None:
            return found
        raise MTAAssertionError(failure())

    async def wait_for(  # type: ignore[override]  # the awaited form of TestMTA.wait_for
            self, count: int = 1, timeout: float = 5.0, **match: Any) -> list[CapturedMessage]:
        """Await *count* messages matching *match* (the criteria of ``TestMTA.wait_for``);
        the event loop runs on meanwhile.  On timeout the error lists what did arrive."""
        return await self._until_async(lambda: self._check_wait(count, match), timeout,
                                       lambda: self._explain(self._expected(count, timeout, match), match))

    async def wait_for_one(  # type: ignore[override]
            self, timeout: float = 5.0, **match: Any) -> CapturedMessage:
        """Await the message matching *match*; fail as soon as more than one matches."""
        return await self._until_async(lambda: self._check_one(match), timeout,
                                       lambda: self._explain(self._expected(1, timeout, match), match))

    async def wait_for_attempts(  # type: ignore[override]
            self, count: int = 1, timeout: float = 5.0) -> list[Attempt]:
        """Await *count* ended SMTP sessions; every ended one."""
        return await self._until_async(lambda: self._check_attempts(count), timeout,
                                       lambda: self._attempts_failure(count, timeout))

    async def wait_for_delivery(  # type: ignore[override]
            self, count: int = 1, timeout: float = 5.0, **match: Any) -> list[Delivery]:
        """Relay mode: await *count* delivery outcomes matching *match* (see TestMTA.wait_for_delivery)."""
        return await self._until_async(lambda: self._check_deliveries(count, match), timeout,
                                       lambda: self._deliveries_failure(count, timeout, match))

    def assert_nothing_sent(self, within: float = 0.0) -> Awaitable[None]:  # type: ignore[override]
        """Fail now if a message arrived; with *within*, ``await`` it: it watches that
        many seconds and fails as soon as one arrives (the trio form's contract)."""
        self._check_nothing()
        return self._nothing_within(within) if within > 0 else _DONE

    async def _nothing_within(self, within: float) -> None:
        with anyio.move_on_after(within):
            await self._until_async(self._check_nothing, math.inf, str)
