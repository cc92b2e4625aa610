"""Where the mail log goes: stderr, ``maillog_file``, or syslog.

Each destination is a ``logging`` handler the writer thread (``trimail.log``)
drives.  Stream destinations write the lines waiting with one ``write()``
(``emit_many``) -- into a pipe or socket (stderr under systemd, a FIFO), which the
workers share, in pieces of whole lines of at most ``PIPE_BUF`` bytes, the most
that POSIX writes to a pipe whole: a larger write could be cut by another
process's lines when the reader lags; syslog gets one datagram per line.
``maillog_file`` is opened at
start (before serve drops root or enters its jail) and reopened when logrotate
moves it (no signal needed): the path's inode is compared with the open file's
before each write.  ``MailLogFile.enter_jail`` follows the path as seen from
inside a ``chroot = yes`` jail when the file lies inside it; a file outside stays
open and is written, never reopened.  A rotated file serve may no longer open (it
became ``mail_owner``) is not reopened either: one warning, and the old file goes
on receiving the lines.

Security notes: a destination's own failure (EPIPE, ENOSPC, EIO) is said on stderr
once per kind of error, in one line, never as a traceback per record, and never
reaches the code that logged.

Parameters: maillog_file, syslog_facility (read by the caller, which passes them
to ``trimail.log.setup``).
"""

from __future__ import annotations

import errno
import logging
import logging.handlers
import os
import select
import stat
import sys
import time
from pathlib import Path
from typing import TextIO


class _QuietErrors:
    """A destination that fails (EPIPE, ENOSPC, EIO) says so on stderr once per
    kind of error, in one line, instead of logging's traceback per record."""

    _reported: set[str]

    def handleError(self, record: logging.LogRecord) -> None:  # logging's name
        error = sys.exc_info()[1]
        kind = type(error).__name__
        if kind in self._reported:
            return
        self._reported.add(kind)
        try:
            sys.stderr.write(f"trimail: warning: cannot write the mail log: {kind}: {error}\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass


PIPE_BUF = select.PIPE_BUF  # bytes a pipe takes whole from one write (4096 on Linux)


def _pieces(lines: list[str], limit: int = PIPE_BUF) -> list[str]:
    """*lines* joined into pieces of whole lines, each at most *limit* bytes in UTF-8
    (a longer line is a piece of its own)."""
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for line in lines:
        length = len(line) if line.isascii() else len(line.encode("utf-8", "surrogateescape"))
        if current and size + length > limit:
            pieces.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += length
    if current:
        pieces.append("".join(current))
    return pieces


def _stream_facts(stream: TextIO) -> tuple[bool, bool]:
    """(Whether one write of any size reaches *stream* whole: a regular file, not a
    pipe or a socket, or what cannot say (a StringIO in tests: one piece); whether a
    write into it returns without waiting for a reader: a regular file or a character
    device (/dev/null), not a pipe or FIFO, a socket or a terminal), from one fstat."""
    try:
        fd = stream.fileno()
        mode = os.fstat(fd).st_mode
    except (OSError, ValueError, AttributeError):
        return True, False  # no descriptor: nobody else writes into it, and nothing says it never waits
    regular = stat.S_ISREG(mode)
    return regular, regular or stat.S_ISCHR(mode) and not os.isatty(fd)  # a terminal can stop


class _Batched:
    """Stream destinations write the lines waiting with one ``write()`` (one per
    ``PIPE_BUF`` into a pipe or socket) and flush."""

    stream: TextIO | None
    terminator: str
    _facts: tuple[TextIO | None, bool, bool] = (None, True, False)  # the stream last asked about, _stream_facts

    def _facts_now(self) -> tuple[TextIO | None, bool, bool]:
        stream = self.stream
        if self._facts[0] is not stream:  # asked again when it changes (a maillog_file reopened)
            self._facts = (stream, *_stream_facts(stream))  # type: ignore[arg-type]
        return self._facts

    def never_waits(self) -> bool:
        """Whether a write into the open stream returns without waiting for a reader
        (``trimail.log.write_waiting``); False with no stream."""
        return self.stream is not None and self._facts_now()[2]

    def emit_many(self, records: list[logging.LogRecord], reopen: bool = True) -> None:  # the caller holds the lock
        lines = []
        for record in records:
            try:
                lines.append(self.format(record) + self.terminator)  # type: ignore[attr-defined]
            except RecursionError:
                raise
            except Exception:  # noqa: BLE001 - logging's rule: the destination's trouble never reaches the caller
                self.handleError(record)  # type: ignore[attr-defined]
        stream = self.stream
        if not lines or stream is None:
            return
        try:
            for piece in ["".join(lines)] if self._facts_now()[1] else _pieces(lines):
                stream.write(piece)
                self.flush()  # type: ignore[attr-defined]
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - as above (EPIPE, ENOSPC, EIO: said once per kind)
            self.handleError(records[-1])  # type: ignore[attr-defined]


class StreamLog(_QuietErrors, _Batched, logging.StreamHandler):  # type: ignore[type-arg]
    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._reported = set()


class SyslogLog(_QuietErrors, logging.handlers.SysLogHandler):
    def __init__(self, facility: int) -> None:
        super().__init__("/dev/log", facility=facility)
        self._reported = set()


REFUSED_RETRY = 60.0  # seconds before a refused maillog_file of the same inode number is tried again


def open_log(path: str) -> int:
    """``maillog_file`` opened for appending as Postfix's safe_open would: the master
    opens it as root, and whoever may write its directory (a user, mail_owner) could
    otherwise have root append to, create, or feed their own reader with it (red teams
    33b-33d).  A symlink is followed only when root owns it and its directory and
    nobody else may write there (``/dev/stdout``; only that first link is vetted, as
    Postfix does); what is opened must be a character device, what such a link leads
    to, or a single-linked file, FIFO or socket that root or this process owns or that
    lies in a directory only root may write (logrotate's ``create 0640 syslog adm``).
    A FIFO without a reader is an error, not a wait.  A new file is made 0640."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOCTTY | os.O_CLOEXEC | os.O_NONBLOCK
    via_link = False
    try:
        try:
            fd = os.open(path, flags | os.O_NOFOLLOW, 0o640)
        except OSError as exc:
            if exc.errno != errno.ELOOP or not _roots_link(path):
                raise
            via_link = True
            fd = os.open(path, flags, 0o640)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            raise OSError(errno.ENXIO, "a FIFO nobody reads") from None
        raise
    try:
        st = os.fstat(fd)
        judged = os.path.realpath(path) if via_link else path  # (a file beyond a link: in its own directory)
        if not (stat.S_ISCHR(st.st_mode) or (via_link and not stat.S_ISREG(st.st_mode)) or _may_use(judged, st)):
            raise OSError(errno.EPERM, f"not opened: owned by uid {st.st_uid} in a directory others may write, "
                                       "or a hard link")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _roots_link(path: str) -> bool:
    try:
        link, parent = os.lstat(path), os.stat(os.path.dirname(os.path.abspath(path)))
    except OSError:
        return False
    return stat.S_ISLNK(link.st_mode) and link.st_uid == 0 and _roots_only(parent)


def _may_use(path: str, st: os.stat_result) -> bool:
    if stat.S_ISREG(st.st_mode) and st.st_nlink != 1:
        return False
    if st.st_uid in (0, os.geteuid()):
        return True
    try:  # another user's file where only root could have put it
        return _roots_only(os.stat(os.path.dirname(os.path.abspath(path))))
    except OSError:
        return False


def _roots_only(directory: os.stat_result) -> bool:
    return directory.st_uid == 0 and not directory.st_mode & 0o022


class MailLogFile(_QuietErrors, _Batched, logging.handlers.WatchedFileHandler):
    """``maillog_file``: reopened when logrotate moves it, while its path can be
    seen and opened; otherwise the open file goes on receiving the lines."""

    def __init__(self, filename: str) -> None:
        super().__init__(filename, encoding="utf-8")
        self._reported = set()
        self.follow = True  # compare the path with the open file before each write
        self.refused: tuple[tuple[int, int] | None, float] | None = None  # the name's file last refused, when

    def _open(self):  # logging's name: every open, at start and after logrotate moved the file
        return open(open_log(self.baseFilename), "a", encoding=self.encoding, errors=self.errors)

    def emit_many(self, records: list[logging.LogRecord], reopen: bool = True) -> None:
        """WatchedFileHandler.emit, once for all *records*."""
        if reopen:
            self.reopenIfNeeded()
        if self.stream is None and (self.mode != "w" or not self._closed):  # type: ignore[attr-defined]
            self.stream = self._open()
        super().emit_many(records)

    def moved(self) -> bool:
        """Whether the next write reopens the file first (its path names another file,
        or none, and not the one refused last)."""
        if not self.follow:
            return False
        try:
            sres = os.stat(self.baseFilename)
            found: tuple[int, int] | None = (sres.st_dev, sres.st_ino)
        except OSError:  # none there (or a dangling symlink)
            found = None
        moved = found != (self.dev, self.ino)
        if moved and self.refused is not None and self.refused[0] == found:
            return time.monotonic() - self.refused[1] > REFUSED_RETRY  # (a new file may reuse the number)
        return moved

    def reopenIfNeeded(self) -> None:  # logging's name
        if not self.moved():
            return
        try:
            fresh = self._open()
        except OSError as exc:  # e.g. the new file belongs to root now that we are mail_owner
            try:  # the next file there (the admin's fix, the next rotation) is tried (red teams 33d, 33e)
                seen = os.stat(self.baseFilename)
                self.refused = ((seen.st_dev, seen.st_ino), time.monotonic())
            except OSError:
                self.refused = (None, time.monotonic())
            logging.getLogger("trimail.master").warning(
                "maillog_file %s: cannot reopen after it was moved (%s); writing on to the moved file",
                self.baseFilename, exc.strerror or exc)
            return
        old, self.stream = self.stream, fresh
        if old is not None:
            try:
                old.close()
            except OSError:
                pass
        self._statstream()

    def enter_jail(self, root: Path) -> str | None:
        """Follow the path as seen from inside a jail rooted at *root*; a warning
        when the file lies outside it (then it is written, never reopened)."""
        path = Path(self.baseFilename)
        try:
            inside = path.resolve().relative_to(root.resolve())
        except ValueError:
            self.follow = False
            return (f"maillog_file {path} lies outside the chroot jail {root}: it stays open, but is not "
                    "reopened when logrotate moves it (use copytruncate, syslog, or a file in the jail)")
        self.baseFilename = str(Path("/") / inside)
        return None
