"""``TestMTA``: the synchronous form, trio running in a background thread.

    with TestMTA() as mta:
        smtplib.SMTP(mta.host, mta.port).sendmail("a@example.org", ["b@example.com"], "Subject: hi\\r\\n\\r\\nx")
        [message] = mta.wait_for(subject="hi")

Each instance has its own ephemeral port and temporary directory, so parallel
test processes (pytest-xdist) never clash.
"""

from __future__ import annotations

import threading
from typing import Any

import trio

from trimail.testing.base import MTAAssertionError, TestMTABase
from trimail.testing.content import CapturedMessage
from trimail.testing.mta import running


class TestMTA(TestMTABase):
    __test__ = False

    def __init__(self, *, relay: bool = False, transport: dict[str, str] | None = None, tls: bool = False,
                 auth: dict[str, str] | None = None, require_auth: bool = False, require_tls: bool = False,
                 **config: Any) -> None:
        super().__init__()
        self._options = dict(relay=relay, transport=transport, tls=tls, auth=auth, require_auth=require_auth,
                             require_tls=require_tls, **config)
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> TestMTA:
        self._thread = threading.Thread(target=self._main, name="trimail-test-mta", daemon=True)
        self._thread.start()
        self._ready.wait(60)
        if self._error is not None:
            raise self._error
        if not self._ready.is_set():
            raise RuntimeError("the test MTA did not start within 60 s")
        return self

    def _main(self) -> None:
        try:
            trio.run(self._run)
        except BaseException as exc:  # reported to start() or stop()
            self._error = exc
            self._ready.set()

    async def _run(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with running(self, **self._options):
            self._ready.set()
            await self._stop.wait()

    def stop(self) -> None:
        if self._thread is None:
            return
        if self._token is not None and self._stop is not None:
            try:
                self._token.run_sync_soon(self._stop.set)
            except trio.RunFinishedError:
                pass
        self._thread.join(30)
        self._thread = None

    def __enter__(self) -> TestMTA:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_for(self, count: int = 1, timeout: float = 5.0, **match: Any) -> list[CapturedMessage]:
        """Wait until *count* messages matching *match* arrived; return them.  Match on
        ``recipient``, ``sender``, ``subject``, ``header=(name, value)``, ``body`` (text
        or HTML), ``text``, ``html``, ``attachment`` (a filename, substring),
        ``predicate``; ``exactly=n`` fails as soon as more than n match.  On timeout
        the error lists what did arrive."""
        try:
            return self.wait_for_sync(count, timeout, **match)
        except MTAAssertionError as failure:
            raise _with_event_loop_hint(failure) from None


def _with_event_loop_hint(failure: MTAAssertionError) -> MTAAssertionError:
    """A blocking wait that timed out inside a coroutine may have starved the very
    task that was to send: say so, and name the awaited form."""
    import sniffio

    try:
        library = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return failure
    return MTAAssertionError(
        f"{failure}\n(this wait blocked the {library} event loop it was called from, so no task of that "
        "loop could send meanwhile: use trimail.testing.AsyncTestMTA and `await mta.wait_for(...)`)")
