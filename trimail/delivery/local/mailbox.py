"""Writing mail into Maildirs and mbox files, safely and with bounded waits.

Maildir (maildir(5)): the message is written to ``tmp/`` under a unique name,
fsynced, and renamed into ``new/``; then the directory is fsynced.  A write that
fails (disk full, read-only file system) removes its file from ``tmp/`` before
the error goes up, so a failed delivery leaves nothing behind.  Directories are
created idempotently: two first deliveries to a new mailbox at once both succeed.

mbox: the file is locked as ``mailbox_delivery_lock`` says (Postfix's default on
Linux: ``fcntl, dotlock``) - first ``FILE.lock`` (created with ``O_EXCL``, removed
when older than ``stale_lock_time``), then the open file with ``fcntl``/``flock``
- each tried ``deliver_lock_attempts`` times, ``deliver_lock_delay`` apart (with
Postfix's random spread), never blocking: a mail client holding the lock costs a
deferral (``MailboxLocked``, 4.2.0), never a stuck worker.  Between attempts the
wait notices a cancelled trio task (``trio.from_thread.check_cancelled``), so
``trimail stop`` is not held up by a lock either.  Then the message is appended
with a ``From sender date`` line, ``>From `` quoting, LF line ends and a blank
line, and fsynced; a failed write is truncated away.  Files are created 0600,
directories 0700.

Security notes: a mailbox path is built only from a user name that passed
``check_user()`` (no ``/``, no ``..``, no control characters, no leading dot)
under ``mail_spool_directory``; every open uses ``O_NOFOLLOW`` and directories
are checked not to be symlinks, so neither a hostile local part nor a planted
symlink can make delivery write elsewhere; an mbox name ending in ``.lock`` is
refused (it would be another mailbox's dotlock).  An ``OSError`` is returned to
the caller as a temporary failure: mail is deferred, never dropped.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import itertools
import os
import random
import re
import socket
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import trio

_USER = re.compile(r"[a-z0-9_][a-z0-9_.+=-]{0,63}")
_counter = itertools.count()
_SLICE = 0.1  # seconds between looks at cancellation while waiting for a lock


class MailboxError(Exception):
    """A target that must never be written (bad name, symlink): the mail bounces."""


class MailboxLocked(Exception):
    """The mbox stayed locked by someone else for every attempt: the mail waits (4.2.0)."""


@dataclasses.dataclass(frozen=True, slots=True)
class LockPolicy:
    """mailbox_delivery_lock, deliver_lock_attempts, deliver_lock_delay, stale_lock_time."""

    methods: tuple[str, ...] = ("fcntl", "dotlock")
    attempts: int = 20
    delay: float = 1.0
    stale: float = 500.0


def check_user(name: str) -> str:
    if not _USER.fullmatch(name) or ".." in name:
        raise MailboxError(f"unsafe local mailbox name {name!r}")
    return name


def _ensure_dir(path: Path) -> None:
    """*path* is a directory (created 0700 if missing, also when another delivery
    creates it at the same moment) and not a symlink."""
    try:
        os.mkdir(path, 0o700)
        return
    except FileExistsError:
        pass
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise MailboxError(f"{path} is not a directory (symlinks are not followed)")


def mailbox_path(spool: Path, user: str, home_mailbox: str) -> tuple[Path, bool]:
    """(path, is_maildir) for *user*; creates the user's mail home."""
    check_user(user)
    spool.mkdir(mode=0o755, parents=True, exist_ok=True)
    _ensure_dir(spool)
    home = spool / user
    if not home_mailbox:
        if user.endswith(".lock"):
            raise MailboxError(f"unsafe local mailbox name {user!r} (a dotlock file name)")
        return home, False
    relative = home_mailbox.strip("/")
    if relative and (".." in relative.split("/") or relative.startswith("/")):
        raise MailboxError(f"home_mailbox {home_mailbox!r} must be a relative path without ..")
    _ensure_dir(home)
    target = home / relative if relative else home
    return target, home_mailbox.endswith("/")


def deliver_maildir(maildir: Path, content: bytes) -> str:
    """Write one message; returns its file name in new/.  Nothing is left in tmp/
    when it fails."""
    for part in (maildir, maildir / "tmp", maildir / "new", maildir / "cur"):
        _ensure_dir(part)
    name = f"{time.time_ns() // 1000}.P{os.getpid()}Q{next(_counter)}.{socket.gethostname().replace('/', '_')}"
    tmp = maildir / "tmp" / name
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        try:
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, maildir / "new" / name)
    except BaseException:
        _unlink(tmp)
        raise
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


def deliver_mbox(path: Path, content: bytes, sender: str, lock: LockPolicy = LockPolicy(),
                 dotlock_may_fail: bool = False) -> None:
    """Append one message to the mbox *path* under the locks *lock* names.
    *dotlock_may_fail*: a dotlock that cannot be created for another reason than
    "someone holds it" (a directory we may not write) is skipped, as Postfix does
    for deliveries to files."""
    _ensure_dir(path.parent)
    with _dotlock(path, lock, dotlock_may_fail):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
                raise MailboxError(f"{path} is not a plain file with one link")
            _kernel_lock(fd, lock)
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
                _kernel_unlock(fd, lock)
        finally:
            os.close(fd)


def _kernel_lock(fd: int, lock: LockPolicy) -> None:
    """fcntl and/or flock, each non-blocking, retried (Postfix's deliver_flock)."""
    for method in ("flock", "fcntl"):
        if method not in lock.methods:
            continue
        for attempt in range(1, max(1, lock.attempts) + 1):
            try:
                if method == "fcntl":
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                else:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                if attempt >= lock.attempts:
                    raise MailboxLocked("unable to lock for exclusive access: "
                                        f"{os.strerror(errno.EAGAIN)}") from None
                _pause(lock.delay)


def _kernel_unlock(fd: int, lock: LockPolicy) -> None:
    if "fcntl" in lock.methods:
        fcntl.lockf(fd, fcntl.LOCK_UN)
    if "flock" in lock.methods:
        fcntl.flock(fd, fcntl.LOCK_UN)


@contextmanager
def _dotlock(path: Path, lock: LockPolicy, may_fail: bool) -> Iterator[None]:
    """``path.lock`` held for the block (Postfix's dot_lockfile): created with
    O_EXCL; one older than *stale* seconds is removed; only "file exists" is retried."""
    if "dotlock" not in lock.methods:
        yield
        return
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            yield  # no dotlock for /dev/null and other non-files
            return
    except FileNotFoundError:
        pass
    lock_file = path.with_name(path.name + ".lock")
    held = False
    for attempt in range(1, max(1, lock.attempts) + 1):
        try:
            os.close(os.open(lock_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0))
            held = True
            break
        except FileExistsError:
            if attempt >= lock.attempts:
                raise MailboxLocked(f"unable to create lock file {lock_file}: "
                                    f"{os.strerror(errno.EEXIST)}") from None
        except OSError:
            if not may_fail:
                raise
            break  # e.g. a directory we may not write: deliver with the kernel lock only
        try:
            if time.time() > os.lstat(lock_file).st_ctime + lock.stale:
                os.unlink(lock_file)  # stale: its owner died long ago
                continue
        except FileNotFoundError:
            continue
        _pause(lock.delay)
    try:
        yield
    finally:
        if held:
            _unlink(lock_file)


def _pause(delay: float) -> None:
    """Sleep about *delay* seconds (Postfix's rand_sleep: delay +/- delay/2), looking
    every ``_SLICE`` seconds whether the trio task that runs us was cancelled."""
    end = time.monotonic() + random.uniform(delay / 2, delay * 1.5)
    while True:
        _check_cancelled()
        left = end - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(_SLICE, left))


def _check_cancelled() -> None:
    try:
        trio.from_thread.check_cancelled()
    except RuntimeError:
        pass  # not a trio worker thread (the CLI, a test): nothing can cancel us


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
