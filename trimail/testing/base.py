"""What both forms of the test MTA share: the captured messages, matching,
waiting and assertions (``TestMTABase``), with fault injection mixed in from
faults.py.  The trio form is ``open_test_mta`` (mta.py); the synchronous form is
``TestMTA`` (sync.py)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from trimail.testing.content import CapturedMessage
from trimail.testing.faults import Fault, FaultInjection
from trimail.testing.matching import matches


class MTAAssertionError(AssertionError):
    pass


class TestMTABase(FaultInjection):
    """Captured mail and fault injection, shared by the trio and the sync forms."""

    __test__ = False  # not a test class, whatever pytest thinks of the name

    host: str = "127.0.0.1"
    port: int = 0

    def __init__(self) -> None:
        self.server: Any = None
        self.ca: Any = None
        self.directory: Path | None = None
        self._messages: list[CapturedMessage] = []
        self._faults: list[Fault] = []
        self._greylist: set[tuple[str, str, str]] | None = None
        self._lock = threading.Condition()

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
        """Forget captured messages and undo every fault injection."""
        with self._lock:
            self._messages.clear()
            self._faults.clear()
            self._greylist = None

    def matching(self, **match: Any) -> list[CapturedMessage]:
        return [m for m in self.messages if matches(m, match)]

    def _check_wait(self, count: int, match: dict[str, Any]) -> list[CapturedMessage] | None:
        """The matching messages once there are *count* of them; ``exactly=n`` in
        *match* waits for n and fails as soon as more than n match."""
        criteria = {k: v for k, v in match.items() if k != "exactly"}
        found = self.matching(**criteria)
        exactly = match.get("exactly")
        if exactly is None:
            return found if len(found) >= count else None
        if len(found) > exactly:
            raise MTAAssertionError(self._explain(
                f"expected exactly {exactly} message(s) matching {criteria or 'anything'}, "
                f"{len(found)} matched"))
        return found if len(found) == exactly else None

    @staticmethod
    def _expected(count: int, timeout: float, match: dict[str, Any]) -> str:
        criteria = {k: v for k, v in match.items() if k != "exactly"}
        wanted = f"exactly {match['exactly']}" if match.get("exactly") is not None else str(count)
        return f"expected {wanted} message(s) matching {criteria or 'anything'} within {timeout:g}s"

    def _explain(self, what: str) -> str:
        arrived = self.messages
        lines = [what, f"{len(arrived)} message(s) arrived:"]
        lines += [f"  {m}" for m in arrived] or ["  (none)"]
        return "\n".join(lines)

    def wait_for_sync(self, count: int = 1, timeout: float = 5.0, **match: Any) -> list[CapturedMessage]:
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                found = self._check_wait(count, match)
                if found is not None:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise MTAAssertionError(self._explain(self._expected(count, timeout, match)))
                self._lock.wait(remaining)

    def assert_sent_to(self, *recipients: str, count: int | None = None) -> list[CapturedMessage]:
        found = [m for m in self.messages if all(r.lower() in (x.lower() for x in m.recipients) for r in recipients)]
        if not found or (count is not None and len(found) != count):
            raise MTAAssertionError(self._explain(
                f"expected {count if count is not None else 'some'} message(s) to {', '.join(recipients)}"))
        return found

    def assert_nothing_sent(self) -> None:
        if self.messages:
            raise MTAAssertionError(self._explain("expected no messages"))
