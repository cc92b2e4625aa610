"""What a mail log line looks like, in Postfix's format, so pflogsumm and operators'
habits work.

``Mon DD HH:MM:SS host trimail/<part>[pid]: text`` (``PostfixFormatter``), or
``trimail/<part>[pid]: text`` for syslog, which adds time and host itself
(``SyslogFormatter``).  *part* is the last component of the logger name
(``trimail.smtpd`` logs as ``trimail/smtpd``); a warning, error or critical record
gets Postfix's ``warning:``, ``error:`` or ``fatal:`` in front of its text.  The
writer thread formats (``trimail.log``), never the thread that logs; the
timestamp is computed once per second.

Security notes: a formatter writes the text it is given; client-supplied text is
made printable and bounded before it is logged (``printable`` in ``trimail.log``).

Parameters: none (the host name, ``myhostname``, is the caller's).
"""

from __future__ import annotations

import logging
import os
import time


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


class SyslogFormatter(logging.Formatter):
    """syslog adds time and host itself: ``trimail/part[pid]: text``."""

    def format(self, record: logging.LogRecord) -> str:
        line = PostfixFormatter("x").format(record)
        return line.split(" ", 4)[4]
