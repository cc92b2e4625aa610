"""One delivery attempt as Postfix's smtp(8) makes it (smtp_connect.c): the
recipients a session leaves soft-failed — a 4xx reply to MAIL, RCPT, DATA or the
end of data, or a connection lost or timed out in the transaction — are not
deferred at once while the attempt may still use another mail host: they go to
the next MX host (or the next address of the host), a session of its own, up to
``smtp_mx_session_limit`` sessions in all (default 2; 0: no limit but
``MX_SESSIONS_CAP``), never back to an address the attempt already had a session
with.  A session that greets with 4xx or cannot be reached does not count
(``Connector.open`` goes on to the next address, within smtp_mx_address_limit).
An unexpected failure of a backup session (a bug, content that cannot be read
again) is logged and ends the attempt with the outcomes decided so far: it never
undoes a recipient an earlier session delivered (that would send it twice).

Parameters: smtp_mx_session_limit (through ``Connector.session_limit``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Callable

from trimail.delivery.connector import ConnectionFailed, Connector
from trimail.delivery.outcome import REPLY_TEXT_LIMIT, Outcome
from trimail.delivery.route import Route
from trimail.delivery.smtp import Connection, Envelope
from trimail.log import printable
from trimail.supervise import report

log = logging.getLogger("trimail.smtp")

MX_SESSIONS_CAP = 10  # sessions of one attempt when smtp_mx_session_limit is 0 (no limit)


async def deliver(connector: Connector, conn: Connection, route: Route, envelope: Envelope,
                  content: Callable[[], AsyncIterator[bytes]], queue_id: str = "") -> tuple[list[Outcome], str]:
    """One attempt over *conn*, then backup sessions for the soft-failed recipients.
    Returns one Outcome per recipient and the relay of the session that decided
    last.  *conn* stays open (the caller's connection cache); a backup session is
    closed after its transaction."""
    outcomes = await conn.deliver(envelope, content)
    relay, used = conn.relay, {conn.address}
    most = connector.session_limit or MX_SESSIONS_CAP
    while len(used) < most:
        moving = [i for i, outcome in enumerate(outcomes) if outcome.status == "deferred"]
        if not moving:
            break
        try:
            backup = await connector.open(route, skip=frozenset(used))
        except ConnectionFailed:
            break  # no other host: the soft failures stand
        except Exception as exc:  # noqa: BLE001 - a bug here must not undo what is decided
            report(f"{queue_id or route.nexthop}: backup session for {route}", exc, logger=log)
            break
        used.add(backup.address)
        # Postfix logs the soft failure that sends recipients to a backup host at info (the
        # peer's text made printable and bounded, as on every status= line: red team 33a)
        log.info("%s: %s", queue_id or route.nexthop, printable(outcomes[moving[0]].text, REPLY_TEXT_LIMIT))
        try:
            more = await backup.deliver(_only(envelope, moving), content)
        except Exception as exc:  # noqa: BLE001 - the recipients delivered so far stay delivered
            report(f"{queue_id or route.nexthop}: backup session with {backup.relay}", exc, logger=log)
            break  # (raising would defer them all, the delivered ones too: sent twice)
        finally:
            await backup.close()
        for i, outcome in zip(moving, more, strict=True):
            outcomes[i] = outcome
        relay = backup.relay
    return outcomes, relay


def _only(envelope: Envelope, which: list[int]) -> Envelope:
    """*envelope* for the recipients at *which*, each with its own DSN parameters."""
    return dataclasses.replace(envelope, recipients=[envelope.recipients[i] for i in which],
                               dsn_rcpts=tuple(envelope.dsn_rcpts[i] for i in which) if envelope.dsn_rcpts else ())
