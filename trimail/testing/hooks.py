"""The test MTA's side of the session hooks (trimail/receive/hooks.py): what every
SMTP session of a test MTA calls.  It captures accepted mail, records each session
as an ``Attempt`` and each delivery outcome as a ``Delivery`` (observe.py), and makes
the armed faults (faults.py) happen: a refusal or a late reply at a stage, a
dropped connection, a cut in the middle of DATA, a failing STARTTLS."""

from __future__ import annotations

import ssl
from typing import Any

import trio

from trimail.receive.hooks import AcceptedMessage, DropConnection, SessionHooks
from trimail.receive.session import SmtpdSession
from trimail.smtp.replies import Reply
from trimail.testing.content import CapturedMessage
from trimail.testing.faults import Fault, tls_fault_context
from trimail.testing.observe import Attempt, Delivery


class _Hooks(SessionHooks):
    def __init__(self, owner: Any) -> None:
        self.owner = owner
        self._live: dict[int, Attempt] = {}  # the sessions in progress (all on the MTA's trio thread)
        self._dropped: set[int] = set()
        self._tls: dict[str, ssl.SSLContext] = {}

    async def connected(self, session: SmtpdSession, greeting: Reply | None) -> Reply | None:
        attempt = Attempt(session.client_address)
        self._live[id(session)] = attempt
        self.owner._record_attempt(attempt)
        fault = self.owner._match_fault("connect", session.client_address)
        if fault is None:
            return greeting
        return await self._apply(fault, session) or greeting

    async def before(self, stage: str, session: SmtpdSession, address: str | None) -> Reply | None:
        txn = session.txn
        fault = self.owner._match_fault(stage, address, txn.sender if txn is not None else None,
                                        session.client_address)
        return None if fault is None else await self._apply(fault, session)

    async def _apply(self, fault: Fault, session: SmtpdSession) -> Reply | None:
        if fault.delay is not None:
            await trio.sleep(fault.delay)
        elif fault.reply is None:
            self._dropped.add(id(session))
            raise DropConnection
        return fault.reply

    def received(self, session: SmtpdSession, data: bytes) -> None:
        attempt = self._live.get(id(session))
        if attempt is None:
            return
        in_data, before = attempt.in_data, attempt.content_received
        attempt.received(data)  # (BDAT: a chunk's bytes come with their command)
        if (in_data or attempt.content_received > before) and self.owner._cut_after(attempt.content_received):
            self._dropped.add(id(session))
            raise DropConnection

    def sent(self, session: SmtpdSession, data: bytes) -> None:
        attempt = self._live.get(id(session))
        if attempt is not None:
            attempt.sent(data)

    def tls_context(self, session: SmtpdSession, context: ssl.SSLContext) -> ssl.SSLContext:
        fault = self.owner._match_fault("starttls", None)
        if fault is None or fault.tls is None:
            return context
        if fault.tls not in self._tls:
            hosts = [address.host for address in self.owner.server.addresses if address.host not in ("", "0.0.0.0", "::")]
            self._tls[fault.tls] = tls_fault_context(fault.tls, self.owner.ca, hosts)
        return self._tls[fault.tls]

    def ended(self, session: SmtpdSession) -> None:
        attempt = self._live.pop(id(session), None)
        if attempt is None:
            return
        dropped = id(session) in self._dropped
        self._dropped.discard(id(session))
        attempt.end(dropped=dropped, tls=session.tls is not None)
        self.owner._attempt_ended()

    def accepted(self, message: AcceptedMessage) -> None:
        self.owner._capture(CapturedMessage.of(message))

    def delivered(self, queue_id: str, recipient: str, status: str, dsn: str, reply: str, relay: str) -> None:
        """The scheduler's observer (trimail/scheduler/results.py): one recipient's outcome."""
        self.owner._record_delivery(Delivery(queue_id, recipient, status, dsn, reply, relay))
