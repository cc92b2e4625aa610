"""``TestMTA``: the synchronous form, trio running in a background thread.

    with TestMTA() as mta:
        smtplib.SMTP(mta.host, mta.port).sendmail("a@example.org", ["b@example.com"], "Subject: hi\\r\\n\\r\\nx")
        [message] = mta.wait_for(subject="hi")

Each instance has its own ephemeral port and temporary directory, so parallel
test processes (pytest-xdist) never clash.

The thread (``_Runner``) holds the ``TestMTA`` only through a weak proxy, so a
``TestMTA`` whose ``stop()`` was forgotten is still garbage-collected; its
finalizer then stops the MTA and removes the temporary directory, and so does the
interpreter's exit for one still alive.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import trio

from trimail.testing.base import TestMTABase
from trimail.testing.content import CapturedMessage
from trimail.testing.mta import check_options, remove_directory, running


class _Runner:
    """The background thread and its trio loop for one ``TestMTA``."""

    def __init__(self, mta: TestMTABase, options: dict[str, Any]) -> None:
        self.mta = weakref.proxy(mta)  # never a strong reference: see the module's docstring
        self.options = options
        self.thread: threading.Thread | None = None
        self.token: trio.lowlevel.TrioToken | None = None
        self.stopping: trio.Event | None = None
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.directory: Any = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._main, name="trimail-test-mta", daemon=True)
        self.thread.start()
        self.ready.wait(60)
        if self.error is not None:
            raise self.error
        if not self.ready.is_set():
            raise RuntimeError("the test MTA did not start within 60 s")

    def _main(self) -> None:
        try:
            trio.run(self._run)
        except BaseException as exc:  # reported to start()
            self.error = exc
            self.ready.set()

    async def _run(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        self.stopping = trio.Event()
        async with running(self.mta, **self.options):
            self.directory = self.mta.directory
            self.ready.set()
            await self.stopping.wait()

    def stop(self) -> None:
        """Stop the loop and wait for it (unless called on its own thread, as a
        finalizer may be); idempotent."""
        thread, self.thread = self.thread, None
        if thread is None:
            return
        if self.token is not None and self.stopping is not None:
            try:
                self.token.run_sync_soon(self.stopping.set)
            except trio.RunFinishedError:
                pass
        if thread is not threading.current_thread():
            thread.join(30)
            if self.directory is not None:
                remove_directory(self.directory)


class TestMTA(TestMTABase):
    __test__ = False

    def __init__(self, *, relay: bool = False, transport: dict[str, str] | None = None, tls: bool = False,
                 auth: dict[str, str] | None = None, require_auth: bool = False, require_tls: bool = False,
                 **config: Any) -> None:
        check_options(config, f"{type(self).__name__}()")
        super().__init__()
        self._options = dict(relay=relay, transport=transport, tls=tls, auth=auth, require_auth=require_auth,
                             require_tls=require_tls, **config)
        self._runner: _Runner | None = None

    def start(self) -> TestMTA:
        runner = self._runner = _Runner(self, self._options)
        weakref.finalize(self, runner.stop)  # a forgotten stop(): when collected, or at exit
        runner.start()
        return self

    def stop(self) -> None:
        if self._runner is not None:
            self._runner.stop()

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
        return self.wait_for_sync(count, timeout, **match)
