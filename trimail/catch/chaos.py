"""Mailpit's chaos triggers on the catcher's SMTP sessions, and its capture.

``Chaos`` holds Mailpit's three triggers (``Sender``: MAIL FROM, ``Recipient``:
RCPT TO, ``Authentication``: AUTH), each an ``ErrorCode`` (400-599) answered with a
``Probability`` (0-100 percent), as ``PUT /api/v1/chaos`` sets them.  ``CatchHooks``
is the ``SessionHooks`` the catcher puts on its listener: it asks the triggers
first, then the test MTA's own fault injection (trimail.testing), and stores each
accepted message in the ``Mailbox``.  The reply text is Mailpit's ("Chaos sender
error"); the enhanced status code is ours (RFC 3463 X.7.0).

The random draws come from ``random.Random(seed)``: ``--chaos-seed`` makes a run
repeatable, which Mailpit cannot do.
"""

from __future__ import annotations

import logging
import random
from typing import Any

from trimail.catch.store import Mailbox
from trimail.receive.hooks import AcceptedMessage, SessionHooks
from trimail.smtp.replies import Reply

log = logging.getLogger("trimail.catch")

TRIGGERS = {"Sender": 451, "Recipient": 451, "Authentication": 535}
STAGES = {"mail": ("Sender", "sender"), "rcpt": ("Recipient", "recipient"), "auth": ("Authentication", "authentication")}


class ChaosError(ValueError):
    """A trigger outside Mailpit's bounds (the API answers 400 with this text)."""


class Chaos:
    def __init__(self, enabled: bool = False, seed: int | None = None) -> None:
        self.enabled = enabled
        self.random = random.Random(seed)
        self.config = {name: {"ErrorCode": code, "Probability": 0} for name, code in TRIGGERS.items()}

    def triggers(self) -> dict[str, dict[str, int]]:
        return {name: dict(trigger) for name, trigger in self.config.items()}

    def set_all(self, data: dict[str, Any]) -> None:
        """Set every trigger from a ``ChaosTriggers`` object (keys in lower case);
        an absent trigger is reset to probability 0, an ErrorCode of 0 means the
        default, and nothing changes when any value is out of bounds."""
        new = {}
        for name, default in TRIGGERS.items():
            given = data.get(name.lower()) or {}
            if not isinstance(given, dict):
                raise ChaosError(f"{name} must be an object")
            given = {str(k).lower(): v for k, v in given.items()}
            try:
                code = int(given.get("errorcode") or 0) or default
                probability = int(given.get("probability") or 0)
            except (TypeError, ValueError, OverflowError):  # OverflowError: 1e400 or Infinity
                raise ChaosError(f"{name}: ErrorCode and Probability must be numbers") from None
            if not 400 <= code <= 599:
                raise ChaosError("error code must be between 400 and 599")
            if not 0 <= probability <= 100:
                raise ChaosError("probability must be between 0 and 100")
            new[name] = {"ErrorCode": code, "Probability": probability}
        self.config = new

    def fire(self, stage: str) -> Reply | None:
        """The reply a trigger gives at *stage* now, or None."""
        if not self.enabled or stage not in STAGES:
            return None
        name, word = STAGES[stage]
        trigger = self.config[name]
        if trigger["Probability"] <= 0 or self.random.randrange(100) >= trigger["Probability"]:
            return None
        code = trigger["ErrorCode"]
        return Reply(code, f"{code // 100}.7.0", f"Chaos {word} error")


class CatchHooks(SessionHooks):
    """Chaos first, then the test MTA's faults; accepted mail into the mailbox."""

    def __init__(self, mailbox: Mailbox, chaos: Chaos, inner: SessionHooks | None) -> None:
        self.mailbox = mailbox
        self.chaos = chaos
        self.inner = inner

    async def before(self, stage: str, session: Any, address: str | None) -> Reply | None:
        reply = self.chaos.fire(stage)
        if reply is not None:
            self.mailbox.rejected += 1
            return reply
        return None if self.inner is None else await self.inner.before(stage, session, address)

    def accepted(self, message: AcceptedMessage) -> None:
        """Store the message; if adding Mailpit's header fields fails on some odd
        message (a bug of ours), it is stored as received and the failure logged:
        the SMTP session has already committed it and must not pay for it."""
        username = message.sasl_username or ""
        try:
            self.mailbox.add(message.raw, sender=message.sender, recipients=list(message.recipients),
                             username=username)
        except Exception:  # any bug of ours, see above
            log.exception("catch: message %s stored without Mailpit's fields", message.queue_id)
            self.mailbox.add_raw(message.raw, username=username)
