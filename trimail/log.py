"""Mail log lines in Postfix's format, so pflogsumm and operators' habits work.

``Mon DD HH:MM:SS host trimail/<part>[pid]: text``; *part* is the last component
of the logger name (``trimail.smtpd`` logs as ``trimail/smtpd``).  Messages are
written to stderr by default.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import time
from typing import TextIO


class PostfixFormatter(logging.Formatter):
    """Formats one line per record; the timestamp is computed once per second
    (the mail log is on the hot path of every message)."""

    def __init__(self, hostname: str) -> None:
        super().__init__()
        self.hostname = hostname.split(".")[0] if hostname else "localhost"
        self._pid = os.getpid()
        self._second = -1
        self._prefix = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:
            self._second = second
            stamp = time.strftime("%b %e %H:%M:%S", time.localtime(second))
            self._prefix = f"{stamp} {self.hostname} trimail/"
        part = record.name.rsplit(".", 1)[-1] if "." in record.name else "master"
        text = record.getMessage()
        if record.levelno >= logging.ERROR:
            text = f"error: {text}" if record.levelno < logging.CRITICAL else f"fatal: {text}"
        elif record.levelno >= logging.WARNING:
            text = f"warning: {text}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return f"{self._prefix}{part}[{self._pid}]: {text}"


def setup(hostname: str, stream: TextIO | None = None, level: int = logging.INFO, maillog_file: str = "",
          syslog_facility: str = "mail") -> None:
    """Send the mail log to *maillog_file* (reopened when logrotate moves it), to
    syslog when it is ``syslog``, else to stderr."""
    # The logging HOWTO's "Optimization" settings: we never print caller, thread or
    # process fields, and collecting them costs a measurable share of each message.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger("trimail")
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler: logging.Handler
    if maillog_file == "syslog":
        facility = logging.handlers.SysLogHandler.facility_names.get(syslog_facility, "mail")
        handler = logging.handlers.SysLogHandler("/dev/log", facility=facility)
        handler.setFormatter(SyslogFormatter())
    elif maillog_file:
        handler = logging.handlers.WatchedFileHandler(maillog_file, encoding="utf-8")
        handler.setFormatter(PostfixFormatter(hostname))
    else:
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.setFormatter(PostfixFormatter(hostname))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


class SyslogFormatter(logging.Formatter):
    """syslog adds time and host itself: ``trimail/part[pid]: text``."""

    def format(self, record: logging.LogRecord) -> str:
        line = PostfixFormatter("x").format(record)
        return line.split(" ", 4)[4]


def printable(text: str, limit: int = 256) -> str:
    """Client-supplied text made safe for a log line or a header: printable, bounded."""
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in text[:limit])
    return cleaned + ("..." if len(text) > limit else "")
