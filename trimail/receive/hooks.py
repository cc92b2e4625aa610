"""The extension point trimail.testing uses: refuse, delay or drop a session at a
stage, and learn about every message committed.  Production serve sets no hooks, and
the session asks for them only when set."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from trimail.smtp.replies import Reply

if TYPE_CHECKING:
    from trimail.receive.session import SmtpdSession


class DropConnection(Exception):
    """Raised by a hook to make the session vanish without a reply (fault injection)."""


@dataclasses.dataclass(slots=True)
class AcceptedMessage:
    """What a hook learns about each message committed to the queue."""

    queue_id: str
    sender: str
    recipients: list[str]
    params: dict[str, str | None]
    client_address: str
    helo: str
    protocol: str
    tls: str | None
    sasl_username: str
    raw: bytes


class SessionHooks:
    """Extension points used by trimail.testing: refuse, delay or drop at a stage
    (``mail``, ``rcpt``, ``data``, ``end``) and learn about accepted messages."""

    async def before(self, stage: str, session: SmtpdSession, address: str | None) -> Reply | None:
        return None

    def accepted(self, message: AcceptedMessage) -> None:
        pass
