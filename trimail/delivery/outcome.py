"""The result of delivering to one recipient: sent, deferred or bounced, with an
RFC 3463 status and the text for the log and the DSN (a value, never an
exception, for every agent: smtp, local, virtual, error, discard).

``classify`` turns an SMTP server's reply (a ``trimail.smtp.replies.Reply`` from
the protocol machine in trimail.smtp.client) into an outcome with Postfix's
wording: ``host mx[192.0.2.1] said: 550 5.1.1 ... (in reply to RCPT TO command)``.
The enhanced code is the server's when its class matches the reply code, else
``4.0.0``/``5.0.0``; a success where a refusal was expected is a broken peer
(4.5.0).  ``Relayed`` is a success at a server without DSN (a success notice is due).
"""

from __future__ import annotations

import dataclasses

from trimail.smtp.replies import Reply

REPLY_TEXT_LIMIT = 1000  # characters of a peer's reply kept with a recipient and logged


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one recipient: sent, deferred or bounced, and why."""

    status: str  # "sent" | "deferred" | "bounced"
    dsn: str  # RFC 3463 status, e.g. "2.0.0", "4.4.1", "5.1.1"
    text: str  # for the log and the DSN: "host said: 550 5.1.1 ... (in reply to RCPT TO command)"

    @property
    def done(self) -> bool:
        return self.status != "deferred"


@dataclasses.dataclass(frozen=True, slots=True)
class Relayed(Outcome):
    """Sent to a next hop that does not offer DSN (RFC 3461 5.2.2): a recipient that
    asked NOTIFY=SUCCESS is told now, ``Action: relayed``, since no one after us will."""


def sent(text: str) -> Outcome:
    return Outcome("sent", "2.0.0", text)


def deferred(dsn: str, text: str) -> Outcome:
    return Outcome("deferred", dsn, text)


def bounced(dsn: str, text: str) -> Outcome:
    return Outcome("bounced", dsn, text)


def classify(reply: Reply, host: str, stage: str) -> Outcome:
    """A server's reply to a delivery outcome (Postfix's wording in the text)."""
    text = f"host {host} said: {reply.code}{' ' + reply.enhanced if reply.enhanced else ''} " \
           f"{' '.join(reply.lines())} (in reply to {stage} command)"
    if reply.code < 400:
        if stage == "end of DATA" and reply.code < 300:
            return sent(f"{reply.code} {reply.enhanced} {' '.join(reply.lines())}".replace("  ", " "))
        # only 250/251 to RCPT (handled by the caller) and 2xx after the final dot
        # deliver; anything else below 400 where a refusal was expected (a 252 to
        # RCPT, a 251 to MAIL, a 250 to DATA) is a broken peer: try again later
        return deferred("4.5.0", f"{text}: unexpected reply")
    klass = "4" if reply.code < 500 else "5"
    dsn = reply.enhanced if reply.enhanced.startswith(klass) else f"{klass}.0.0"
    return deferred(dsn, text) if klass == "4" else bounced(dsn, text)
