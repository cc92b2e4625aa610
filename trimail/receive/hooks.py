"""The extension point trimail.testing uses: refuse, delay or drop a session at a
stage (connect, auth, mail, rcpt, data, end), see the session's plaintext bytes both
ways, choose the STARTTLS context, and learn about every message committed and how
each session ended.  Production serve sets no hooks, and the session asks for them
only when set."""

from __future__ import annotations

import dataclasses
import ssl
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
    (``auth`` with the user name, ``mail`` with the sender, ``rcpt`` with the
    recipient, ``data``, ``end``; ``connected`` for the greeting) and learn about
    accepted messages and each session's bytes and end."""

    async def connected(self, session: SmtpdSession, greeting: Reply | None) -> Reply | None:
        """Before the greeting: the greeting to give (None: the usual banner); may
        wait (a slow banner) or raise DropConnection (a refused connection)."""
        return greeting

    async def before(self, stage: str, session: SmtpdSession, address: str | None) -> Reply | None:
        return None

    def received(self, session: SmtpdSession, data: bytes) -> None:
        """Bytes from the client (plaintext, also after STARTTLS), before the session
        reads them; may raise DropConnection."""

    def sent(self, session: SmtpdSession, data: bytes) -> None:
        """Bytes to the client (plaintext), as they are sent."""

    def tls_context(self, session: SmtpdSession, context: ssl.SSLContext) -> ssl.SSLContext:
        """The context for this session's TLS handshake."""
        return context

    def ended(self, session: SmtpdSession) -> None:
        """The session is over (the connection is being closed)."""

    def accepted(self, message: AcceptedMessage) -> None:
        pass
