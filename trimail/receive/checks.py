"""header_checks and body_checks on a message received over SMTP, at the end of DATA,
before the milters (as Postfix's cleanup(8) inspects the content as it streams in
and runs the milters once it is complete): the spool is scanned line by line
(``trimail.cleanup.checks``), an edited message (IGNORE, PREPEND, REPLACE) replaces
it, and the actions become the transaction's: REJECT is the reply to DATA
(``550 5.7.1 ...``, or ``451 4.x.x`` for a 4.x.x code), HOLD, DISCARD, REDIRECT and
FILTER go into its verdict as an access-table action's would.  Each action is
logged as cleanup's ``cleanup_act_log`` writes it:

    ID: reject: header Subject: spam from host[addr]; from=<a@b> to=<c@d> proto=ESMTP helo=<h>: 5.7.1 text

A table that cannot be read costs the message a ``451 4.3.0``, as Postfix's cleanup
defers it.  Nothing happens with ``receive_override_options = no_header_body_checks``.

Parameters: header_checks, mime_header_checks, nested_header_checks, body_checks,
body_checks_size_limit, line_length_limit, receive_override_options, table_lookup_timeout.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import trio

from trimail.cleanup.checks import ContentChecks
from trimail.config import Config
from trimail.log import printable
from trimail.maps import TableError, off_loop, open_table
from trimail.queue.spool import Spool, SpoolError
from trimail.smtp import replies
from trimail.smtp.replies import Reply

if TYPE_CHECKING:
    from trimail.receive.session import SmtpdSession

log = logging.getLogger("trimail.cleanup")

CHECK_PARAMS = ("header_checks", "mime_header_checks", "nested_header_checks", "body_checks")


def content_checks(config: Config) -> ContentChecks | None:
    """The four tables of *config* (opened lazily), or None when every list is empty."""
    tables = [[open_table(ref, lazy=True) for ref in config.get(name)] for name in CHECK_PARAMS]
    checks = ContentChecks(*tables, body_limit=config.body_checks_size_limit, line_limit=config.line_length_limit)
    return checks if checks.active() else None


def _lines(spool: Spool) -> Iterator[bytes]:
    carry = b""
    for chunk in spool.chunks(1 << 16):
        lines = (carry + chunk).split(b"\n")
        carry = lines.pop()
        for line in lines:
            yield line + b"\n"
    if carry:
        yield carry


async def check_content(session: SmtpdSession) -> Reply | None:
    """Run the checks on the transaction's content; a Reply when the message is refused."""
    ctx, txn = session.ctx, session.txn
    assert txn is not None and txn.spool is not None
    checks = ctx.content_checks
    if checks is None or txn.verdict.discard or txn.header_too_big \
            or "no_header_body_checks" in ctx.receive_override_options:
        return None
    notes: list[tuple[str, str, str, str]] = []
    out = Spool(ctx.spool_directory)
    spool = txn.spool

    def scan():
        return checks.scan(_lines(spool), out.write, lambda *note: notes.append(note))

    tables = [*checks.header, *checks.mime, *checks.nested, *checks.body]
    try:
        if spool.in_memory:
            outcome = await off_loop(tables, scan, timeout=ctx.lookup_timeout)
        else:
            outcome = await trio.to_thread.run_sync(scan)
        await out.finish()
    except (TableError, SpoolError) as exc:
        out.close()
        log.warning("%s: header/body checks failed: %s", txn.queue_id, exc)
        session._discard()
        return replies.LOCAL_ERROR
    recipient = f" to=<{txn.recipients[0]}>" if txn.recipients else ""
    for action, what, text, arg in notes:
        if not what:
            log.warning("%s", text)
            continue
        log.info("%s: %s: %s %s from %s; from=<%s>%s proto=%s helo=<%s>%s", txn.queue_id, action, what,
                 printable(text, 200).removesuffix("..."), session.client, txn.envelope_sender, recipient,
                 "ESMTP" if session.extended else "SMTP", session.helo_name, f": {arg}" if arg else "")
    if outcome.reject is not None:
        out.close()
        session._discard()
        code, _, text = outcome.reject.partition(" ")
        return Reply(550 if code.startswith("5") else 451, code, text.strip())
    verdict = txn.verdict
    if outcome.discard:
        verdict.discard = "header_checks"
    if outcome.hold:
        verdict.hold = "header_checks"
    if outcome.redirect:
        verdict.redirect = outcome.redirect
    if outcome.filter:
        verdict.filter = outcome.filter
    if outcome.edited:
        spool.close()
        txn.spool = out
    else:
        out.close()
    return None
