"""Fault injection for the test MTA: refuse, defer, drop, slow down or greylist
at a chosen stage of the SMTP dialogue, matched on sender or recipient patterns.
``_Hooks`` is what the SMTP sessions call; ``FaultInjection`` is the part of the
test MTA's API that arms the faults."""

from __future__ import annotations

import dataclasses
import fnmatch
import threading
from typing import Any

import trio

from trimail.receive.hooks import AcceptedMessage, DropConnection, SessionHooks
from trimail.receive.session import SmtpdSession
from trimail.smtp.replies import Reply
from trimail.testing.content import CapturedMessage

STAGES = ("mail", "rcpt", "data", "end")


@dataclasses.dataclass(slots=True)
class Fault:
    stage: str
    reply: Reply | None  # None: drop the connection
    pattern: str | None = None  # fnmatch pattern on the sender (mail) or recipient (rcpt)
    remaining: int | None = None  # None: every time
    delay: float = 0.0


class _Hooks(SessionHooks):
    def __init__(self, owner: Any) -> None:
        self.owner = owner

    async def before(self, stage: str, session: SmtpdSession, address: str | None) -> Reply | None:
        fault = self.owner._match_fault(stage, address, session)
        if fault is None:
            return None
        if fault.delay:
            await trio.sleep(fault.delay)
        if fault.reply is None and fault.delay == 0.0:
            raise DropConnection
        return fault.reply

    def accepted(self, message: AcceptedMessage) -> None:
        self.owner._capture(CapturedMessage.of(message))


class FaultInjection:
    """The fault-arming half of the test MTA's API (mixed into ``TestMTABase``)."""

    _lock: threading.Condition
    _faults: list[Fault]
    _greylist: set[tuple[str, str, str]] | None

    def _add(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def reject(self, *, rcpt: str | None = None, sender: str | None = None, stage: str | None = None,
               code: int = 550, text: str = "Rejected by the test MTA", enhanced: str | None = None,
               count: int | None = None) -> Fault:
        """Refuse a recipient (``rcpt`` pattern), a sender, or the ``data``/``end`` stage."""
        chosen = stage or ("rcpt" if rcpt else "mail" if sender else "data")
        if chosen not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}")
        klass = "4" if code < 500 else "5"
        default = {"mail": "1.0", "rcpt": "1.1", "data": "7.1", "end": "7.1"}[chosen]
        reply = Reply(code, enhanced or f"{klass}.{default}", text)
        return self._add(Fault(chosen, reply, rcpt or sender, count))

    def defer(self, *, rcpt: str | None = None, sender: str | None = None, stage: str | None = None,
              code: int = 451, text: str = "Try again later", count: int | None = None) -> Fault:
        return self.reject(rcpt=rcpt, sender=sender, stage=stage, code=code, text=text, count=count,
                           enhanced="4.7.1" if code != 452 else "4.5.3")

    def defer_next(self, count: int = 1, code: int = 451, text: str = "Try again later") -> Fault:
        """The next *count* messages are deferred at the end of DATA."""
        return self._add(Fault("end", Reply(code, "4.3.0", text), None, count))

    def drop(self, stage: str = "data", count: int | None = None) -> Fault:
        """Close the connection without a reply at *stage*."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}")
        return self._add(Fault(stage, None, None, count))

    def slow(self, seconds: float, stage: str = "rcpt") -> Fault:
        """Delay the reply at *stage* by *seconds*, then answer normally."""
        return self._add(Fault(stage, None, None, None, delay=seconds))

    def greylist(self) -> None:
        """Defer the first attempt of each (client, sender, recipient) triple with 450."""
        with self._lock:
            self._greylist = set()

    def _match_fault(self, stage: str, address: str | None, session: SmtpdSession) -> Fault | None:
        with self._lock:
            if stage == "rcpt" and self._greylist is not None and session.txn is not None:
                triple = (session.client_address, session.txn.sender.lower(), (address or "").lower())
                if triple not in self._greylist:
                    self._greylist.add(triple)
                    return Fault("rcpt", Reply(450, "4.7.1", f"<{address}>: Recipient address rejected: "
                                                             "Greylisted, try again later"))
            for fault in self._faults:
                if fault.stage != stage:
                    continue
                if fault.pattern is not None and not fnmatch.fnmatch((address or "").lower(), fault.pattern.lower()):
                    continue
                if fault.remaining is not None:
                    if fault.remaining <= 0:
                        continue
                    fault.remaining -= 1
                return fault
        return None
