"""The child that writes one message as the delivery's user: an mbox ``/file``
target of local delivery, or a virtual(8) mailbox.

``python -m trimail.delivery.local.filewriter UID GID PATH SENDER LOCKS ATTEMPTS DELAY STALE``
with the message on standard input; started as root by
``trimail.delivery.local.identity.append_file``.

``python -m trimail.delivery.local.filewriter --virtual UID GID BASE RELATIVE MAILDIR SENDER
LOCKS ATTEMPTS DELAY STALE``: the virtual(8) mailbox RELATIVE (validated by
trimail.delivery.virtual) under BASE, a Maildir when MAILDIR is 1; started as
root by ``trimail.delivery.virtual`` (in serve run as root, or in the root
helper trimail.delivery.local.roothelper).  A fresh process, never a fork of serve's
threads: a fork keeps locks other threads held, this child starts clean.

Once its modules are imported (the
interpreter may live where the user cannot read) it becomes UID/GID for good,
with GID as its only group (Postfix's set_ugid; refusing uid or gid 0 and
checking that root cannot be regained), before it reads the message or touches
PATH: the kernel checks the user's own permissions and a created file belongs
to that user.  The writing itself is ``trimail.delivery.local.mailbox.deliver_mbox``
(O_NOFOLLOW, locks, fsync).

Exit status (sysexits.h) and one line on standard error: 0 delivered; 75 the
mbox stayed locked or the disk is full (temporary); 77 permission denied, 73 a
path that cannot be created, 65 a target that must never be written (symlink,
not a regular file) - permanent, as Postfix's local(8) bounces them (5.2.0);
1 anything else (temporary).  ``--virtual``: 0 delivered; 65 an unsafe mailbox
(a symlink or non-directory in the path, not a regular file: bounced 5.3.5); 73
the mbox stayed locked (4.2.0); 75 anything else (4.3.0).
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

from trimail.delivery.local.mailbox import (
    LockPolicy,
    MailboxError,
    MailboxLocked,
    _ensure_dir,
    deliver_maildir,
    deliver_mbox,
)

MAX_MESSAGE = 1 << 30
# --virtual: bounced 5.3.5, deferred 4.2.0 (EX_CANTCREAT: the lock), deferred 4.3.0
EX_DATAERR, EX_LOCKED, EX_TEMPFAIL = os.EX_DATAERR, os.EX_CANTCREAT, os.EX_TEMPFAIL


def write_mailbox(base: Path, relative: str, maildir: bool, content: bytes, sender: str,
                  lock: LockPolicy) -> None:
    """Create the directories of a virtual mailbox under *base* one by one (0700,
    never through a symlink) and deliver; runs with the mailbox owner's privileges."""
    parts = relative.split("/")
    where = base
    for part in parts[:-1] if not maildir else parts:
        where = where / part
        _ensure_dir(where)
    if maildir:
        deliver_maildir(where, content)
    else:
        deliver_mbox(where / parts[-1], content, sender, lock)


def attempt(base: Path, relative: str, maildir: bool, content: bytes, sender: str,
            lock: LockPolicy) -> tuple[int, str]:
    """(exit code, reason) of one virtual mailbox write: 0, EX_DATAERR, EX_LOCKED or EX_TEMPFAIL."""
    try:
        write_mailbox(base, relative, maildir, content, sender, lock)
    except MailboxError as exc:
        return EX_DATAERR, str(exc)
    except MailboxLocked as exc:
        return EX_LOCKED, f"mailbox locked: {exc}"
    except OSError as exc:
        return EX_TEMPFAIL, str(exc.strerror or exc)
    return 0, ""


def main_virtual(argv: list[str]) -> int:
    uid, gid, base, relative, maildir, sender, methods, attempts, delay, stale = argv
    become(int(uid), int(gid))
    lock = LockPolicy(tuple(m for m in methods.split(",") if m), int(attempts), float(delay), float(stale))
    content = sys.stdin.buffer.read(MAX_MESSAGE)
    code, reason = attempt(Path(base), relative, maildir == "1", content, sender, lock)
    if reason:
        print(reason, file=sys.stderr)
    return code


def become(uid: int, gid: int) -> None:
    if uid == 0 or gid == 0:
        raise SystemExit("refusing to write a file as root")
    if os.geteuid() == 0:
        os.setgroups([gid])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    if os.geteuid() != uid or os.getegid() != gid:
        raise SystemExit(f"cannot become uid {uid} gid {gid}")
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise SystemExit("still able to become root")


def main(argv: list[str]) -> int:
    if argv[:1] == ["--virtual"]:
        return main_virtual(argv[1:])
    uid, gid, path, sender, methods, attempts, delay, stale = argv
    become(int(uid), int(gid))
    lock = LockPolicy(tuple(m for m in methods.split(",") if m), int(attempts), float(delay), float(stale))
    content = sys.stdin.buffer.read(MAX_MESSAGE)
    try:
        deliver_mbox(Path(path), content, sender, lock, dotlock_may_fail=True)
    except MailboxError as exc:
        print(f"cannot append message to file {path}: {exc}", file=sys.stderr)
        return 65
    except MailboxLocked as exc:
        print(f"cannot append message to file {path}: {exc}", file=sys.stderr)
        return 75
    except OSError as exc:
        print(f"cannot append message to file {path}: {exc.strerror or exc}", file=sys.stderr)
        if exc.errno in (errno.EACCES, errno.EPERM):
            return 77
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ELOOP):
            return 73
        return 75 if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EAGAIN) else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
