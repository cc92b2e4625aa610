"""What both forms of the test MTA share: the captured messages, matching,
waiting and assertions (``TestMTABase``), with fault injection mixed in from
faults.py.  The trio form is ``open_test_mta`` (mta.py); the synchronous form is
``TestMTA`` (sync.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from trimail.testing.content import CapturedMessage
from trimail.testing.faults import Fault, FaultInjection
from trimail.testing.matching import matches, mismatches
from trimail.testing.observe import Attempt, Delivery

T = TypeVar("T")


class MTAAssertionError(AssertionError):
    pass


class Recording(threading.Condition):
    """The test MTA's condition: whatever it records notifies it, and *generation*
    counts the notifications, so a waiter can test its condition without holding it
    (a slow ``predicate`` or a big message's parsing under it held the event-loop
    thread every sync test MTA shares as soon as it recorded anything: red team 34)."""

    generation = 0

    def notify(self, n: int = 1) -> None:
        self.generation += 1
        super().notify(n)

    def notify_all(self) -> None:
        self.generation += 1
        super().notify_all()


class TestMTABase(FaultInjection):
    """Captured mail and fault injection, shared by the trio and the sync forms."""

    __test__ = False  # not a test class, whatever pytest thinks of the name

    host: str = "127.0.0.1"
    port: int = 0

    def __init__(self) -> None:
        self.server: Any = None
        self.ca: Any = None
        self._directory: str | None = None  # made a Path when asked for (``directory``)
        self._messages: list[CapturedMessage] = []
        self._attempts: list[Attempt] = []
        self._deliveries: list[Delivery] = []
        self._faults: list[Fault] = []
        self._greylist: set[tuple[str, str, str]] | None = None
        self._lock: Recording = Recording()

    @property
    def directory(self) -> Path | None:
        """The MTA's temporary directory (its queue, main.cf, certificates); None before start."""
        return None if self._directory is None else Path(self._directory)

    # -- TLS for the client side ---------------------------------------------------

    @property
    def ca_file(self) -> str | None:
        """PEM file of the CA that signed the MTA's certificate (``tls=True``)."""
        if self.ca is None or self.directory is None:
            return None
        path = self.directory / "ca.pem"
        if not path.exists():
            self.ca.cert_pem.write_to_path(str(path))
        return str(path)

    def ssl_context(self) -> Any:
        """A client ``ssl.SSLContext`` that trusts the MTA's certificate."""
        import ssl

        ctx = ssl.create_default_context()
        if self.ca is not None:
            self.ca.configure_trust(ctx)
        return ctx

    # -- capture ---------------------------------------------------------------

    @property
    def messages(self) -> list[CapturedMessage]:
        with self._lock:
            return list(self._messages)

    def _capture(self, message: CapturedMessage) -> None:
        with self._lock:
            self._messages.append(message)
            self._lock.notify_all()

    def clear(self) -> None:
        """Forget captured messages, sessions and deliveries; undo every fault injection."""
        with self._lock:
            self._messages.clear()
            self._attempts.clear()
            self._deliveries.clear()
            self._faults.clear()
            self._greylist = None

    # -- observation: sessions (every one, refused too) and delivery outcomes (relay mode)

    @property
    def attempts(self) -> list[Attempt]:
        """Every SMTP session so far, in the order they connected (``ended`` is None
        while one goes on; ``wait_for_attempts`` waits for them to end)."""
        with self._lock:
            return list(self._attempts)

    @property
    def deliveries(self) -> list[Delivery]:
        """Every delivery outcome so far, one per recipient and attempt (relay mode)."""
        with self._lock:
            return list(self._deliveries)

    def _record_attempt(self, attempt: Attempt) -> None:
        with self._lock:
            self._attempts.append(attempt)

    def _attempt_ended(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def _record_delivery(self, delivery: Delivery) -> None:
        with self._lock:
            self._deliveries.append(delivery)
            self._lock.notify_all()

    def _check_attempts(self, count: int) -> list[Attempt] | None:
        ended = [a for a in self.attempts if a.ended is not None]
        return ended if len(ended) >= count else None

    def _attempts_failure(self, count: int, timeout: float) -> str:
        attempts = self.attempts
        return "\n".join([(f"expected {count} finished SMTP session(s) within {timeout:g}s, "
                          f"{sum(a.ended is not None for a in attempts)} finished:"),
                          *[f"  {a}" for a in attempts]])

    def _check_deliveries(self, count: int, match: dict[str, Any]) -> list[Delivery] | None:
        found = [d for d in self.deliveries if _delivery_matches(d, match)]
        return found if len(found) >= count else None

    def _deliveries_failure(self, count: int, timeout: float, match: dict[str, Any]) -> str:
        deliveries = self.deliveries
        return "\n".join([(f"expected {count} delivery outcome(s) matching {match or 'anything'} within "
                          f"{timeout:g}s, {len(deliveries)} recorded:"), *[f"  {d}" for d in deliveries]]
                         + (["  (none)"] if not deliveries else []))

    def wait_for_attempts_sync(self, count: int = 1, timeout: float = 5.0) -> list[Attempt]:
        return self._until(lambda: self._check_attempts(count), timeout,
                           lambda: self._attempts_failure(count, timeout))

    def wait_for_delivery_sync(self, count: int = 1, timeout: float = 5.0, **match: Any) -> list[Delivery]:
        return self._until(lambda: self._check_deliveries(count, match), timeout,
                           lambda: self._deliveries_failure(count, timeout, match))

    def matching(self, **match: Any) -> list[CapturedMessage]:
        return [m for m in self.messages if matches(m, match)]

    # -- checks: None while the wait goes on, a result to end it, MTAAssertionError to fail

    def _check_wait(self, count: int, match: dict[str, Any]) -> list[CapturedMessage] | None:
        """The matching messages once there are *count* of them; ``exactly=n`` in
        *match* waits for n and fails as soon as more than n match."""
        criteria = _criteria(match)
        found = self.matching(**criteria)
        exactly = match.get("exactly")
        if exactly is None:
            return found if len(found) >= count else None
        if len(found) > exactly:
            raise MTAAssertionError(self._explain(
                f"expected exactly {exactly} message(s) matching {criteria or 'anything'}, "
                f"{len(found)} matched", criteria))
        return found if len(found) == exactly else None

    def _check_one(self, match: dict[str, Any]) -> CapturedMessage | None:
        """The one message matching *match*; fails as soon as more than one match."""
        found = self.matching(**match)
        if len(found) > 1:
            raise MTAAssertionError(self._explain(
                f"expected one message matching {match or 'anything'}, {len(found)} matched", match))
        return found[0] if found else None

    def _check_nothing(self) -> None:
        if self.messages:
            raise MTAAssertionError(self._explain("expected no messages"))

    @staticmethod
    def _expected(count: int, timeout: float, match: dict[str, Any]) -> str:
        criteria = _criteria(match)
        wanted = f"exactly {match['exactly']}" if match.get("exactly") is not None else str(count)
        return f"expected {wanted} message(s) matching {criteria or 'anything'} within {timeout:g}s"

    def _explain(self, what: str, match: dict[str, Any] | None = None) -> str:
        """*what* went wrong, then every message that arrived and, with *match*, each
        criterion it missed (or that it matches)."""
        arrived = self.messages
        lines = [what, f"{len(arrived)} message(s) arrived:"]
        for message in arrived:
            if not match:
                lines.append(f"  {message}")
                continue
            missed = mismatches(message, _criteria(match))
            lines.append(f"  {message}: {'; '.join(missed) if missed else 'matches'}")
        if not arrived:
            lines.append("  (none)")
        troubled = [a for a in self.attempts if a.ended not in (None, "quit") or any(c >= 400 for c in a.replies)]
        if troubled:  # why mail may be missing: refusals, faults, hang-ups (the last ten)
            lines.append(f"{len(troubled)} SMTP session(s) with a refusal or not ended by QUIT:")
            lines += [f"  {attempt}" for attempt in troubled[-10:]]
        return "\n".join(lines)

    # -- waiting and asserting (the sync form; mta.py has the trio form's) ---------

    def _until(self, check: Callable[[], T | None], timeout: float, failure: Callable[[], str]) -> T:
        """Block until *check* returns a result (or raises); after *timeout* seconds
        fail with *failure()*.  Woken by every capture, never polling; *check* runs
        without the lock (``Recording``), and again after anything recorded meanwhile."""
        deadline = time.monotonic() + timeout
        while True:
            seen = self._lock.generation
            found = check()
            if found is not None:
                return found
            with self._lock:
                while self._lock.generation == seen:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise _with_event_loop_hint(MTAAssertionError(failure()))
                    self._lock.wait(remaining)

    def wait_for_sync(self, count: int = 1, timeout: float = 5.0, **match: Any) -> list[CapturedMessage]:
        return self._until(lambda: self._check_wait(count, match), timeout,
                           lambda: self._explain(self._expected(count, timeout, match), match))

    def wait_for_one_sync(self, timeout: float = 5.0, **match: Any) -> CapturedMessage:
        return self._until(lambda: self._check_one(match), timeout,
                           lambda: self._explain(self._expected(1, timeout, match), match))

    def assert_sent_to(self, *recipients: str, count: int | None = None) -> list[CapturedMessage]:
        found = [m for m in self.messages if all(r.lower() in (x.lower() for x in m.recipients) for r in recipients)]
        if not found or (count is not None and len(found) != count):
            raise MTAAssertionError(self._explain(
                f"expected {count if count is not None else 'some'} message(s) to {', '.join(recipients)}"))
        return found

    def assert_not_sent_to(self, *recipients: str) -> None:
        """Fail if any captured message has any of *recipients* (case-insensitive)."""
        unwanted = {r.lower() for r in recipients}
        found = [m for m in self.messages if unwanted & {x.lower() for x in m.recipients}]
        if found:
            raise MTAAssertionError(self._explain(
                f"expected no message to {', '.join(recipients)}, {len(found)} sent: "
                + ", ".join(f"<{m.queue_id}>" for m in found)))

    def assert_nothing_sent(self, within: float = 0.0) -> None:
        """Fail if a message arrived; with *within*, keep watching that many seconds and
        fail as soon as one arrives."""
        deadline = time.monotonic() + within
        with self._lock:
            while True:
                self._check_nothing()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._lock.wait(remaining)


def _delivery_matches(delivery: Delivery, match: dict[str, Any]) -> bool:
    """``status`` and ``dsn`` (equal or a prefix: ``"5."``), ``recipient`` (any case),
    ``reply`` (a substring) and ``queue_id``."""
    for key, wanted in match.items():
        if key == "recipient":
            if delivery.recipient.lower() != wanted.lower():
                return False
        elif key in ("status", "queue_id"):
            if getattr(delivery, key) != wanted:
                return False
        elif key == "dsn":
            if not delivery.dsn.startswith(wanted):
                return False
        elif key == "reply":
            if wanted not in delivery.reply:
                return False
        else:
            raise TypeError(f"unknown delivery keyword {key!r} (status, recipient, dsn, reply, queue_id)")
    return True


def _criteria(match: dict[str, Any]) -> dict[str, Any]:
    """*match* without ``exactly``: what each message is matched on."""
    return {k: v for k, v in match.items() if k != "exactly"}


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
