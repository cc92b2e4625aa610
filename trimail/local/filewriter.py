"""The child that appends one message to an mbox ``/file`` target as the delivery's user.

``python -m trimail.local.filewriter UID GID PATH SENDER LOCKS ATTEMPTS DELAY STALE``
with the message on standard input; started as root by
``trimail.local.identity.append_file``.  Once its modules are imported (the
interpreter may live where the user cannot read) it becomes UID/GID for good,
with GID as its only group (Postfix's set_ugid; refusing uid or gid 0 and
checking that root cannot be regained), before it reads the message or touches
PATH: the kernel checks the user's own permissions and a created file belongs
to that user.  The writing itself is ``trimail.local.mailbox.deliver_mbox``
(O_NOFOLLOW, locks, fsync).

Exit status (sysexits.h) and one line on standard error: 0 delivered; 75 the
mbox stayed locked or the disk is full (temporary); 77 permission denied, 73 a
path that cannot be created, 65 a target that must never be written (symlink,
not a regular file) - permanent, as Postfix's local(8) bounces them (5.2.0);
1 anything else (temporary).
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

from trimail.local.mailbox import LockPolicy, MailboxError, MailboxLocked, deliver_mbox

MAX_MESSAGE = 1 << 30


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
