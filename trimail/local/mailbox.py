"""Writing mail into Maildirs and mbox files, safely.

Maildir (maildir(5)): the message is written to ``tmp/`` under a unique name,
fsynced, and renamed into ``new/``; then the directory is fsynced.  mbox: the file
is opened for append, locked with ``fcntl``, and gets a ``From sender date`` line,
the content with ``>From `` quoting and LF line ends, and a blank line; then it is
fsynced.  Both are created 0600 (directories 0700).

Security notes: a mailbox path is built only from a user name that passed
``check_user()`` (no ``/``, no ``..``, no control characters, no leading dot)
under ``mail_spool_directory``; every open uses ``O_NOFOLLOW`` and directories
are checked not to be symlinks, so neither a hostile local part nor a planted
symlink can make delivery write elsewhere.  An ``OSError`` is returned to the
caller as a temporary failure: mail is deferred, never dropped.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import re
import socket
import stat
import time
from pathlib import Path

_USER = re.compile(r"[a-z0-9_][a-z0-9_.+=-]{0,63}")
_counter = itertools.count()


class MailboxError(Exception):
    """A target that must never be written (bad name, symlink): the mail bounces."""


def check_user(name: str) -> str:
    if not _USER.fullmatch(name) or ".." in name:
        raise MailboxError(f"unsafe local mailbox name {name!r}")
    return name


def _ensure_dir(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        os.mkdir(path, 0o700)
        return
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise MailboxError(f"{path} is not a directory (symlinks are not followed)")


def mailbox_path(spool: Path, user: str, home_mailbox: str) -> tuple[Path, bool]:
    """(path, is_maildir) for *user*; creates the user's mail home."""
    check_user(user)
    spool.mkdir(mode=0o755, parents=True, exist_ok=True)
    _ensure_dir(spool)
    home = spool / user
    if not home_mailbox:
        return home, False
    relative = home_mailbox.strip("/")
    if relative and (".." in relative.split("/") or relative.startswith("/")):
        raise MailboxError(f"home_mailbox {home_mailbox!r} must be a relative path without ..")
    _ensure_dir(home)
    target = home / relative if relative else home
    return target, home_mailbox.endswith("/")


def deliver_maildir(maildir: Path, content: bytes) -> str:
    """Write one message; returns its file name in new/."""
    for part in (maildir, maildir / "tmp", maildir / "new", maildir / "cur"):
        _ensure_dir(part)
    name = f"{time.time_ns() // 1000}.P{os.getpid()}Q{next(_counter)}.{socket.gethostname().replace('/', '_')}"
    tmp = maildir / "tmp" / name
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, maildir / "new" / name)
    _fsync_dir(maildir / "new")
    return name


def mbox_bytes(content: bytes, sender: str) -> bytes:
    """mboxrd: a From_ line, '>'-quoted From lines, LF line ends, a blank line after."""
    stamp = time.strftime("%a %b %e %H:%M:%S %Y", time.localtime())
    lines = content.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    quoted = [b">" + line if re.match(rb">*From ", line) else line for line in lines]
    return f"From {sender or 'MAILER-DAEMON'}  {stamp}\n".encode() + b"\n".join(quoted) + b"\n\n"


def deliver_mbox(path: Path, content: bytes, sender: str) -> None:
    _ensure_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
            raise MailboxError(f"{path} is not a plain file with one link")
        fcntl.lockf(fd, fcntl.LOCK_EX)
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
            data = memoryview(mbox_bytes(content, sender))
            try:
                while data:
                    data = data[os.write(fd, data):]
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, size)  # leave no half message behind
                raise
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
