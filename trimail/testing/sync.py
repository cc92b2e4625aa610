"""``TestMTA``: the synchronous form, trio running in a background thread.

    with TestMTA() as mta:
        smtplib.SMTP(mta.host, mta.port).sendmail("a@example.org", ["b@example.com"], "Subject: hi\\r\\n\\r\\nx")
        [message] = mta.wait_for(subject="hi")

Each instance has its own ephemeral port and temporary directory, so parallel
test processes (pytest-xdist) never clash.

Every ``TestMTA`` of a process runs as a task in one trio loop on a daemon thread
(``_Loop``).  Its task (``_Runner``) holds the ``TestMTA`` only through a weak
proxy, so a ``TestMTA`` whose ``stop()`` was forgotten is still garbage-collected;
its finalizer then stops the MTA and removes the temporary directory, and so does
the interpreter's exit for one still alive.
"""

from __future__ import annotations

import atexit
import os
import threading
import weakref
from typing import Any, Self

import trio

from trimail.testing.base import TestMTABase
from trimail.testing.content import CapturedMessage
from trimail.testing.directories import remove_directory
from trimail.testing.mta import attach, check_options, detach, prepared
from trimail.testing.observe import Attempt, Delivery


class _Loop:
    """One trio loop, on a daemon thread, for every ``TestMTA`` of the process: an
    MTA's start does not pay for a thread and a ``trio.run`` of its own."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.token: trio.lowlevel.TrioToken | None = None
        self.nursery: trio.Nursery | None = None
        ready = threading.Event()
        self.thread = threading.Thread(target=trio.run, args=(self._main, ready), name="trimail-test-mtas",
                                       daemon=True)
        self.thread.start()
        ready.wait()

    async def _main(self, ready: threading.Event) -> None:
        self.token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            ready.set()
            await trio.sleep_forever()

    def spawn(self, fn: Any) -> None:
        assert self.token is not None and self.nursery is not None
        self.token.run_sync_soon(self.nursery.start_soon, fn)

    def close(self) -> None:
        """At exit: the MTAs still running stop (their directories go) and the loop ends
        (not in a forked child, which has no loop thread)."""
        if self.token is not None and self.nursery is not None and self.pid == os.getpid():
            try:
                self.token.run_sync_soon(self.nursery.cancel_scope.cancel)
            except trio.RunFinishedError:
                return
            self.thread.join(30)


_loop: _Loop | None = None
_loop_lock = threading.Lock()


def shared_loop() -> _Loop:
    """The process's loop, started on first use (again in a forked child)."""
    global _loop
    with _loop_lock:
        if _loop is None or _loop.pid != os.getpid() or not _loop.thread.is_alive():
            _loop = _Loop()
            atexit.register(_loop.close)
        return _loop


class _Runner:
    """One ``TestMTA``'s task in the shared loop."""

    def __init__(self, mta: TestMTABase, options: dict[str, Any]) -> None:
        self.mta = weakref.proxy(mta)  # never a strong reference: see the module's docstring
        self.options = options
        self.loop: _Loop | None = None
        self.server: Any = None  # serve's handle, once it is ready
        self.stop_asked = False  # stop() came before serve was ready: it stops as soon as it is
        self.ready = threading.Event()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.directory: Any = None

    def start(self) -> None:
        self.loop = shared_loop()
        self.loop.spawn(self._run)
        self.ready.wait(60)
        if self.error is not None:
            raise self.error
        if not self.ready.is_set():
            raise RuntimeError("the test MTA did not start within 60 s")

    async def _run(self) -> None:
        """Serve in this task (no nursery of its own: ``started`` reports readiness)."""
        from trimail.master import serve

        try:
            with prepared(self.mta, **self.options) as config:
                self.directory = self.mta._directory
                try:
                    await serve(config, task_status=self)
                finally:
                    if self.server is not None:
                        detach(self.server)
                        self.server = None  # the TestMTA keeps it (mta.server), not this task
        except Exception as exc:  # noqa: BLE001 - this MTA's failure (reported to start()) must not end the others
            self.error = exc
        finally:
            self.done.set()
            self.ready.set()

    def started(self, server: Any) -> None:
        """serve's ``task_status.started``: it listens."""
        attach(self.mta, server)
        self.server = server
        self.ready.set()
        if self.stop_asked:
            server.stop()

    def _stop_server(self) -> None:  # in the loop's thread
        self.stop_asked = True
        if self.server is not None:
            self.server.stop()

    def stop(self) -> None:
        """Stop the MTA and wait for it (unless called on the loop's own thread, as a
        finalizer may be); idempotent."""
        loop, self.loop = self.loop, None
        if loop is None or loop.pid != os.getpid():  # a forked child's copy of its parent's MTA
            return
        if loop.token is not None:
            try:
                loop.token.run_sync_soon(self._stop_server)
            except trio.RunFinishedError:
                pass
        if threading.current_thread() is not loop.thread:
            self.done.wait(30)
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
        """Start the MTA; on one already running, nothing (``with TestMTA().start() as mta``):
        a second MTA would have gone on listening and capturing after ``stop()``."""
        running = self._runner
        if running is not None and running.loop is not None and running.loop.pid == os.getpid() \
                and not running.done.is_set():
            return self
        runner = self._runner = _Runner(self, self._options)
        weakref.finalize(self, runner.stop)  # a forgotten stop(): when collected, or at exit
        runner.start()
        return self

    def stop(self) -> None:
        if self._runner is not None:
            self._runner.stop()

    def __enter__(self) -> Self:
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

    def wait_for_one(self, timeout: float = 5.0, **match: Any) -> CapturedMessage:
        """Wait until a message matches *match* (``wait_for``'s criteria) and return it;
        fail as soon as more than one matches, listing them."""
        return self.wait_for_one_sync(timeout, **match)

    def wait_for_attempts(self, count: int = 1, timeout: float = 5.0) -> list[Attempt]:
        """Wait until *count* SMTP sessions have ended; return every ended one."""
        return self.wait_for_attempts_sync(count, timeout)

    def wait_for_delivery(self, count: int = 1, timeout: float = 5.0, **match: Any) -> list[Delivery]:
        """Relay mode: wait until *count* delivery outcomes match ``status`` (``sent``,
        ``deferred``, ``bounced``), ``recipient``, ``dsn`` (a prefix), ``reply`` (a
        substring), ``queue_id``; return them."""
        return self.wait_for_delivery_sync(count, timeout, **match)
