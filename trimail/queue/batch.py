"""One group commit's transaction (``queue.writer``, ``queue.inline``): the requests
of a batch, each in a savepoint of its own, so that one that fails is rolled back
and alone answered with its error, while the others commit; or one request alone,
whose transaction is its savepoint (two statements fewer for every commit of a
quiet gateway); or, for a batch of new messages held in memory (the sessions'
commits, a test MTA's captured message), one statement that is its own
transaction, with no BEGIN, COMMIT or savepoints (``_insert_together``).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import apsw
import trio

from trimail.errors import StorageError
from trimail.queue.database import storage_error
from trimail.queue.store import COMMIT_ROWS, NewMessage, Store

log = logging.getLogger("trimail.queue")

BOOKKEEPING_SLICE = 0.01  # seconds of non-durable requests per transaction, between turns of accepted mail


class Request:
    """One call a writer runs in a transaction for the event loop, and its answer."""

    __slots__ = ("args", "done", "durable", "error", "fn", "result")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], durable: bool) -> None:
        self.fn = fn
        self.args = args
        self.durable = durable
        self.done = trio.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def answer(self) -> Any:
        """The result, once run; the error is raised."""
        if self.error is not None:
            raise self.error
        return self.result


class FailureLog:
    """``queue commit failed`` once a second at most, the failures meanwhile counted
    in the next line: a queue that fails every commit (a full disk under a thousand
    sessions, a WAL removed under serve) logged 400 lines a second.  Thread-safe
    (the writer thread and an event loop's inline commits share it)."""

    INTERVAL = 1.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = -math.inf
        self._more = 0

    def report(self, error: BaseException) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last < self.INTERVAL:
                self._more += 1
                return
            more, self._more, self._last = self._more, 0, now
        log.error("queue commit failed: %s%s", error, f" ({more} more failed since the last report)" if more else "")


_failures = FailureLog()


class _RequestFailed(Exception):
    """A lone request failed: its transaction is rolled back (``_run_alone``)."""


def commit_batch(store: Store, batch: list[Request], source: deque[Request] | None, begun: bool,
                 max_batch: int, started: float, on_no_space: Callable[[], None] | None) -> bool:
    """``run_in_transaction``, then the WAL's fsync when a request is durable (its
    COMMIT did not: queue.database, the fsync outside the lock); whether it was.
    When BEGIN, COMMIT or the fsync fails, nothing is durable: every request gets the
    error.  A request that failed for want of space (its own error or the
    transaction's) calls *on_no_space* first (the queue manager's reserve:
    queue.reserve), so that its caller's next try finds room."""
    durable = any(request.durable for request in batch)
    try:
        store.set_durable(durable)
        run_in_transaction(store, batch, source, begun, max_batch, started)
        if durable:
            store.sync_wal()
    except Exception as exc:  # BEGIN or COMMIT failed (rolled back), or the WAL's fsync: nothing is durable
        error = storage_error(exc)
        _failures.report(error)
        for request in batch:
            request.result = None
            request.error = request.error or error
    if on_no_space is not None and any(isinstance(request.error, StorageError) and request.error.no_space
                                       for request in batch):
        on_no_space()
    return durable


def run_in_transaction(store: Store, batch: list[Request], source: deque[Request] | None, begun: bool,
                       max_batch: int, started: float) -> None:
    """Run *batch* in one transaction (*begun*: already begun); with *source*, take
    requests from it into the batch as they run, until *max_batch* or
    ``BOOKKEEPING_SLICE`` seconds after *started*.  Each request's result or error
    is set on it; BEGIN or COMMIT failing raises (the transaction is rolled back)."""
    if source is None and not begun and _insert_together(store, batch):
        return
    if len(batch) == 1 and source is None:
        _run_alone(store, batch[0], begun)
        return
    with store.transaction(begun=begun):
        index = 0
        while True:
            if index == len(batch):
                if (source is None or not source or len(batch) >= max_batch
                        or time.monotonic() - started > BOOKKEEPING_SLICE):
                    break
                batch.append(source.popleft())
            request = batch[index]
            index += 1
            try:
                with store.savepoint():
                    request.result = request.fn(store, *request.args)
            except Exception as exc:
                request.error = _request_error(exc)


def _insert_together(store: Store, batch: list[Request]) -> bool:
    """A batch of new messages whose content is in memory (the smtpd's group
    commit): inserted and committed by one statement (``Store.commit_messages``),
    or with one statement per table (``Store.insert_messages``) when there are more
    than one statement takes.  False when the batch is anything else, or when that
    transaction failed (rolled back): then each request runs in a savepoint of its
    own, so that only one that fails is answered with its error."""
    if not all(request.fn is Store.insert_message and len(request.args) == 1
               and isinstance(request.args[0], NewMessage) and request.args[0].content.in_memory
               for request in batch):
        return False
    messages = [request.args[0] for request in batch]
    try:
        if len(messages) <= COMMIT_ROWS:
            store.commit_messages(messages)
        else:
            with store.transaction():
                store.insert_messages(messages)
    except Exception:  # anything one request alone might raise (SQLite, the OS, a value it cannot bind)
        return False
    return True


def _run_alone(store: Store, request: Request, begun: bool) -> None:
    """A batch of one request: its transaction does what a savepoint does in a larger
    batch (a request that fails is rolled back, and is the only one that fails)."""
    try:
        with store.transaction(begun=begun):
            try:
                request.result = request.fn(store, *request.args)
            except Exception as exc:
                request.error = _request_error(exc)
                raise _RequestFailed from None
    except _RequestFailed:
        pass  # rolled back: the request's error says why


def _request_error(exc: Exception) -> BaseException:
    """What a failing request's caller gets: SQLite's and the OS's errors as the
    queue's StorageError (database.storage_error), anything else as it is."""
    return storage_error(exc) if isinstance(exc, (apsw.Error, OSError)) else exc
