"""The content inspection of mail submitted locally (``trimail sendmail``, ``sendmail
-bs``, serve's pickup of a user's submission), before it is committed, as Postfix's
cleanup inspects mail from pickup: first ``header_checks``, ``mime_header_checks``,
``nested_header_checks`` and ``body_checks`` (``trimail.cleanup.checks``, the tables
SMTP mail meets too: trimail/receive/checks.py), then ``non_smtpd_milters``
(``trimail.milter.local``).  Mail trimail makes itself (bounces) is inspected by
neither, as Postfix's internal mail (``internal_mail_filter_classes`` empty, and
cleanup's flags for it leave out the header and body checks).

As with the milters, and unlike Postfix (which bounces a message that pickup's
cleanup refuses), the refusal is sendmail's: it reports a REJECT and exits 69 (75 for
a ``4.x.x`` text), and nothing is queued; ``-bs`` answers the message with ``554``.
HOLD, DISCARD, REDIRECT, BCC, FILTER, IGNORE, STRIP, PREPEND, REPLACE, WARN, INFO and
PASS act as for SMTP mail (PASS keeps the message from ``non_smtpd_milters``; FILTER
is stored under ``CHECKS_FILTER_PARAM``: pickup's round puts it in place of its
``content_filter``, as cleanup writes it after pickup's).  Each action is logged as
cleanup logs it for mail from pickup (``from local;``).

Parameters: header_checks, mime_header_checks, nested_header_checks, body_checks,
body_checks_size_limit, line_length_limit, receive_override_options, non_smtpd_milters.
"""

from __future__ import annotations

import json
import os

from trimail.cleanup.checks import (
    ContentChecks,
    Outcome,
    action_lines,
    content_checks,
    log_lines,
)
from trimail.cleanup.loglines import captured
from trimail.config import Config
from trimail.delivery.notify import SILENT_PARAM
from trimail.delivery.route import CHECKS_FILTER_PARAM
from trimail.log import printable


class ContentRefused(Exception):
    """The checks or a filter refused the message; *status* is sendmail's exit status."""

    def __init__(self, text: str, status: int) -> None:
        super().__init__(text)
        self.status = status


def inspect_local(cfg: Config, queue_id: str, sender: str, recipients: list[str], content: bytes,
                  params: dict[str, str | None], *, protocol: str, helo_name: str,
                  keep_log: bool = False) -> tuple[str, list[str], bytes, str, dict[str, str | None],
                                                   list[tuple[int, str]]]:
    """(sender, recipients, content, state, params, log lines) of one local submission
    once inspected; state ``maildrop``, ``hold`` or ``discard``; the log lines, cleanup's
    of the checks' actions (level, text), are the caller's to write (``cleanup.loglines``),
    and with *keep_log* (root's sendmail, one thread) the milters' lines too.
    Raises ContentRefused (its lines written: nothing is queued) and TableError (a table
    that cannot be read)."""
    state = "maildrop"
    actions: list[tuple[int, str]] = []
    if protocol == "bounce":  # trimail's own mail
        return sender, recipients, content, state, params, actions
    options = cfg.receive_override_options
    checks = _checks(cfg) if "no_header_body_checks" not in options else None
    passed = False
    if checks is not None:
        recipients, content, outcome, actions = _check(checks, queue_id, sender, recipients, content, protocol,
                                                       helo_name)
        state = "discard" if outcome.discard else "hold" if outcome.hold else state
        if outcome.filter:
            params = {**params, CHECKS_FILTER_PARAM: outcome.filter}
        if outcome.bcc:
            params = {**params, SILENT_PARAM: json.dumps(outcome.bcc)}
        if state == "discard":
            return sender, recipients, content, state, params, actions
        passed = outcome.passed  # PASS: no milter sees it either
    if cfg.non_smtpd_milters and "no_milters" not in options and not passed:
        from trimail.milter.local import (  # (trio: imported only for the milters)
            MilterRefused,
            filter_local,
        )

        try:
            with captured(keep_log) as filter_lines:  # root's sendmail: kept with the message
                sender, recipients, content, filtered = filter_local(cfg, queue_id, sender, recipients, content,
                                                                     helo_name)
        except MilterRefused as exc:
            raise ContentRefused(str(exc), exc.status) from None
        actions = actions + filter_lines
        if state == "maildrop" or filtered == "discard":
            state = filtered
    return sender, recipients, content, state, params, actions


def _checks(cfg: Config) -> ContentChecks | None:
    return cfg.memo("content_checks", lambda: content_checks(cfg))  # serve's pickup: once per configuration


def _check(checks: ContentChecks, queue_id: str, sender: str, recipients: list[str], content: bytes,
           protocol: str, helo_name: str) -> tuple[list[str], bytes, Outcome, list[tuple[int, str]]]:
    """(recipients, content, outcome, log lines) of the checks; the BCC copies are in
    the recipients and in ``outcome.bcc`` only when they were not recipients already."""
    kept: list[bytes] = []
    notes: list[tuple[str, str, str, str]] = []
    outcome: Outcome = checks.scan(checks.lines((content,)), kept.append, lambda *note: notes.append(note))
    actions = action_lines(queue_id, notes, origin="local", sender=sender, recipients=recipients,
                           proto=protocol if helo_name else None, helo=printable(helo_name, 200))
    if outcome.reject is not None:
        log_lines(actions)  # serve's pickup logs them; root's sendmail has no log (cleanup.loglines)
        raise ContentRefused(f"message content rejected: {outcome.reject}",
                             os.EX_TEMPFAIL if outcome.reject.startswith("4") else os.EX_UNAVAILABLE)
    if outcome.redirect:
        recipients = [outcome.redirect]
    outcome.bcc = [bcc for bcc in outcome.bcc if bcc not in recipients]  # copies: never reported to the sender
    recipients = recipients + outcome.bcc
    if outcome.edited:
        content = b"".join(kept)
    return recipients, content, outcome, actions

