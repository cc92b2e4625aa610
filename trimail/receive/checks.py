"""header_checks and body_checks on a message received over SMTP, at the end of DATA,
before the milters (as Postfix's cleanup(8) inspects the content as it streams in
and runs the milters once it is complete): the spool is scanned line by line
(``trimail.cleanup.checks``), an edited message (IGNORE, PREPEND, REPLACE) replaces
it, and the actions become the transaction's: REJECT is the reply to DATA
(``550 5.7.1 ...``, or ``451 4.x.x`` for a 4.x.x code), HOLD, DISCARD, REDIRECT and
FILTER go into its verdict as an access-table action's would, and PASS keeps the
message from the milters (``Verdict.passed``).  Each action is
logged as cleanup's ``cleanup_act_log`` writes it:

    ID: reject: header Subject: spam from host[addr]; from=<a@b> to=<c@d> proto=ESMTP helo=<h>: 5.7.1 text

A table that cannot be read costs the message a ``451 4.3.0``, as Postfix's cleanup
defers it, and so does a scan that makes no progress for ``table_lookup_timeout``
(a regular expression that backtracks for ever): the scan runs on a thread of its
own pool (``SCAN_THREADS``), never on the event loop, and is abandoned then (it
stops at its next line).  Nothing happens with ``receive_override_options = no_header_body_checks``.

Parameters: header_checks, mime_header_checks, nested_header_checks, body_checks,
body_checks_size_limit, line_length_limit, header_size_limit, receive_override_options, table_lookup_timeout.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import trio

from trimail.cleanup.checks import ContentChecks, Note, Outcome, log_actions
from trimail.maps import TableError
from trimail.queue.spool import Spool, SpoolError
from trimail.smtp import replies
from trimail.smtp.replies import Reply
from trimail.supervise import thread_pool

if TYPE_CHECKING:
    from trimail.receive.session import SmtpdSession

log = logging.getLogger("trimail.cleanup")

SCAN_CHUNK = 1 << 16  # bytes of the spool read at a time (a line may span chunks)
SCAN_THREADS = 4  # scans at once per serve (an abandoned one holds its thread until its lookup returns)
_scan_limiter = thread_pool("trimail_content_checks", SCAN_THREADS)
# One lookup at a time among the scans of a process.  A regexp rule's match holds the
# interpreter (trimail.maps.patterns), and the event loop waited its turn for it
# among every scan thread in a slow match: four scans of a rule taking 70 ms a match
# kept a banner waiting up to 14.8 s (red team 38).  Taking turns, at most one scan
# thread asks for the interpreter at a time, so the loop has it after each match; the
# scans lose nothing, as their matches never ran at once anyway.
_LOOKUP_TURN = threading.Lock()


class _Progress:
    """The lines a scan has taken so far; ``abandoned`` stops it at its next line."""

    def __init__(self) -> None:
        self.lines = 0
        self.started = False  # on a scan thread
        self.abandoned = False

    def count(self, lines: Iterator[bytes]) -> Iterator[bytes]:
        self.started = True
        for line in lines:
            if self.abandoned:
                raise TableError("scan abandoned")
            self.lines += 1
            yield line


def scan_spool(checks: ContentChecks, spool: Spool, out: Spool, note: Note,
               progress: _Progress | None = None) -> Outcome:
    """*spool*'s scan as a scan thread runs it: the kept lines to *out*, its lines counted
    by *progress*, each lookup in its turn (``_LOOKUP_TURN``)."""
    lines = checks.lines(spool.chunks(SCAN_CHUNK))
    return checks.scan(progress.count(lines) if progress else lines, out.write, note, _LOOKUP_TURN)


async def _off_loop(scan, progress: _Progress, timeout: float):
    """*scan()* on a scan thread; TableError when it took no line for *timeout* seconds,
    the thread then abandoned.  The wait for a free thread does not count: a flood of big
    messages that keeps every thread busy is no table that cannot answer (red team 38:
    of 100 messages of 40 MB at once, 45 were refused with ``451``).  That wait is bounded
    by the session's deadline (``smtpd_timeout`` from its last read), as a Postfix smtpd
    waits for a cleanup process, so abandoned scans that hold every thread (each stops at
    its next line) cannot make mail wait for ever."""
    result: list = []

    async def run(cancel_scope: trio.CancelScope) -> None:
        try:
            result.append(await trio.to_thread.run_sync(scan, limiter=_scan_limiter(), abandon_on_cancel=True))
        except Exception as exc:  # TableError, SpoolError, a bug: raised below, not as a group
            result.append(exc)
        cancel_scope.cancel()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, nursery.cancel_scope)
            seen = -1
            while not progress.started or seen != progress.lines:  # the watchdog: a line taken within each period
                seen = progress.lines if progress.started else -1
                await trio.sleep(timeout)
            nursery.cancel_scope.cancel()
    finally:
        progress.abandoned = True  # an abandoned scan stops at its next line
    if not result:
        raise TableError(f"header/body checks: no progress within {timeout:g}s (table_lookup_timeout)")
    if isinstance(result[0], Exception):
        raise result[0]
    return result[0]


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

    progress = _Progress()

    def scan():
        return scan_spool(checks, spool, out, lambda *note: notes.append(note), progress)

    try:
        outcome = await _off_loop(scan, progress, ctx.lookup_timeout)
        await out.finish()
    except (TableError, SpoolError) as exc:
        out.close()
        log.warning("%s: header/body checks failed: %s", txn.queue_id, exc)
        session._discard()
        return replies.LOCAL_ERROR
    except BaseException:  # cancelled (the client left, stop): the copy goes with the session
        out.close()
        raise
    log_actions(txn.queue_id, notes, origin=str(session.client), sender=txn.envelope_sender,
                recipients=txn.recipients, proto="ESMTP" if session.extended else "SMTP", helo=session.helo_name)
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
    verdict.checks_bcc = outcome.bcc
    verdict.passed = outcome.passed
    if outcome.filter:
        verdict.filter = outcome.filter
    if outcome.edited:
        spool.close()
        txn.spool = out
    else:
        out.close()
    return None
