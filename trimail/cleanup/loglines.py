"""The mail log lines of a local submission, as Postfix's pickup and cleanup write them
when they take a message from the maildrop queue:

    ID: uid=0 from=<root@example.com>                          (pickup)
    ID: warning: header Subject: ... from local; from=<...> to=<...>: text   (cleanup, the checks' actions)
    ID: message-id=<...>                                       (cleanup)

serve's pickup of a user's submission (``cleanup/pickup.py``) writes them at once.
Root's and ``mail_owner``'s sendmail write the queue themselves and have no mail log
(serve's is the only writer), so they keep the lines with the message, in its params
under ``LOG_PARAM``; serve's queue manager writes them when its round moves the message
from maildrop to incoming (``queue.transitions.promote_maildrop``), which is when
Postfix's pickup would.  Without this, nothing in the log said that root's mail had
arrived (pflogsumm counts pickup's ``uid=`` lines as received mail), and a
``header_checks`` WARN or a milter's HOLD on it was lost (``captured`` takes what
``milter.local`` logs in sendmail).  A submission that is refused or discarded is
never queued, so its lines are not kept (sendmail reports a refusal itself).

Parameters: none.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator

from trimail.log import printable

LOG_PARAM = "maillog"  # the message's params: a JSON list of [program, level, text]
PROGRAMS = ("pickup", "cleanup")

Line = tuple[str, int, str]  # (program, level, text)

_BLANK_LINE = re.compile(rb"\n\r?\n")
_MESSAGE_ID = re.compile(rb"(?im)^message-id:[ \t]*(.*(?:\r?\n[ \t].*)*)")


def header_message_id(header: bytes | bytearray) -> str | None:
    """The Message-ID of a header section (its folds undone), as cleanup logs it."""
    m = _MESSAGE_ID.search(header)
    if not m:
        return None
    return printable(re.sub(r"\r?\n", "", m.group(1).decode("utf-8", "replace")).strip(), 200)


def submission_lines(queue_id: str, uid: int, sender: str, actions: list[tuple[int, str]],
                     content: bytes) -> list[Line]:
    """pickup's line, cleanup's *actions* (``cleanup.checks.action_lines``) and its
    ``message-id=`` line of one submission."""
    lines: list[Line] = [("pickup", logging.INFO, f"{queue_id}: uid={uid} from=<{printable(sender, 300)}>")]
    lines += [("cleanup", level, text) for level, text in actions]
    blank = _BLANK_LINE.search(content)
    message_id = header_message_id(content[:blank.start() + 1] if blank else content)
    if message_id is not None:
        lines.append(("cleanup", logging.INFO, f"{queue_id}: message-id={message_id}"))
    return lines


@contextlib.contextmanager
def captured(enabled: bool = True) -> Iterator[list[tuple[int, str]]]:
    """(level, text) of what this process logs meanwhile under ``trimail.cleanup`` and
    ``trimail.milter`` (``milter.local``'s ``milter-hold`` lines, a filter's warnings),
    instead of logging it: root's sendmail keeps them as cleanup's lines.  Only in a
    process of one thread (sendmail): the loggers are this process's, and serve's other
    sessions log through them.  Not *enabled*: nothing is taken."""
    lines: list[tuple[int, str]] = []
    if not enabled:
        yield lines
        return

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append((logging.INFO if record.levelno <= logging.INFO else logging.WARNING, record.getMessage()))

    handler = Keep(logging.INFO)
    loggers = [logging.getLogger(name) for name in ("trimail.cleanup", "trimail.milter")]
    saved = [(logger.level, logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    try:
        yield lines
    finally:
        for logger, (level, propagate) in zip(loggers, saved):
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate


def write(lines: list[Line]) -> None:
    for program, level, text in lines:
        logging.getLogger(f"trimail.{program}").log(level, "%s", text)


def settle(lines: list[Line], params: dict[str, str | None], *, now: bool) -> dict[str, str | None]:
    """Write *lines* *now* (serve's pickup; root's sendmail discarding a message: to no
    log), or keep them in a copy of *params* for serve to write; the params to queue."""
    if now:
        write(lines)
    elif lines:
        return {**params, LOG_PARAM: json.dumps([list(line) for line in lines])}
    return params


def write_stored(queue_id: str, value: object) -> None:
    """Write the lines kept under ``LOG_PARAM`` (*value*, as the params hold it); a
    value that is not such a list is reported and skipped, never raised: the qmgr
    calls this in its round, and whatever sits in the queue must not end it."""
    try:
        lines = json.loads(value) if isinstance(value, str) else value
        checked = [(program, level, text) for program, level, text in lines
                   if program in PROGRAMS and type(level) is int and level in (logging.INFO, logging.WARNING)
                   and isinstance(text, str)]  # (a float 20.0 is "in" but logging refuses it: red team 37)
        complete = len(checked) == len(lines)
    except (ValueError, TypeError, RecursionError):
        checked, complete = [], False
    if not complete:
        logging.getLogger("trimail.qmgr").warning("%s: malformed %s in the queue: not logged", queue_id, LOG_PARAM)
    write([(program, level, printable(text, 1000)) for program, level, text in checked])
