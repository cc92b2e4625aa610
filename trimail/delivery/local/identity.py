"""Who a ``|command`` or ``/file`` delivery runs as (Postfix local(8) "DELIVERY RIGHTS").

Targets from the alias table run as ``default_privs`` (default ``nobody``);
targets from an ``:include:`` file as the owner of that file, unless root owns
it (then ``default_privs`` again); an include listed inside such a user's
include file keeps that user (a user cannot borrow the rights of whoever owns a
file they include).  The identity is the user's uid, primary gid, and the
primary gid as the only supplementary group (Postfix's ``set_ugid``): never
root's groups.  Root (uid or gid 0) and ``mail_owner`` (who owns the queue) are
refused as identities: the delivery is deferred with a clear reason.

Switching identity needs root: when serve runs as root (``allow_root = yes``)
each command is a child process started with ``subprocess``'s ``user``,
``group`` and ``extra_groups``, and each file append a small child program
(``trimail.delivery.local.filewriter``) that becomes the user itself before it opens
anything.  A serve that runs as ``mail_owner`` cannot become anyone else: it
hands such targets to its root helper (trimail.delivery.local.privileged), and without
one they are deferred (4.3.0, "serve runs as ..., not root"); they never run
as ``mail_owner`` instead.

Parameters: default_privs, mail_owner.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import subprocess
import sys
from pathlib import Path

from trimail.delivery.local.mailbox import LockPolicy, MailboxError, MailboxLocked, deliver_mbox

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[3])  # where this trimail is imported from


class IdentityError(Exception):
    """The delivery cannot run as the right user; *dsn* says temporary or not."""

    def __init__(self, dsn: str, text: str) -> None:
        super().__init__(text)
        self.dsn = dsn
        self.text = text


@dataclasses.dataclass(frozen=True, slots=True)
class Identity:
    user: str
    uid: int
    gid: int
    home: str

    def can_become(self) -> bool:
        """Whether this process can start a child as this identity."""
        return os.geteuid() in (0, self.uid)

    def spawn(self) -> dict[str, object]:
        """``subprocess`` arguments that start a child as this identity, and only it."""
        euid = os.geteuid()
        if euid == 0:
            return {"user": self.uid, "group": self.gid, "extra_groups": [self.gid]}
        if self.uid == euid:
            return {}  # already this user (serve started by that user, no root anywhere)
        raise IdentityError("4.3.0", f"cannot deliver as user {self.user}: serve runs as uid {euid}, not root "
                                     "(file and command targets need a serve started as root)")


def identity(uid: int | None, default_privs: str, mail_owner: str) -> Identity:
    """The identity for a target whose source is owned by *uid* (None or 0: the
    trusted alias table or a root-owned include file, i.e. ``default_privs``)."""
    try:
        entry = pwd.getpwnam(default_privs) if not uid else pwd.getpwuid(uid)
    except KeyError:
        what = f"default_privs {default_privs!r}" if not uid else f"the :include: file owner uid {uid}"
        raise IdentityError("4.3.5", f"mail system configuration error: {what} has no account") from None
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise IdentityError("4.3.5", f"mail system configuration error: refusing to deliver as privileged "
                                     f"user {entry.pw_name}")
    try:
        owner_uid: int | None = pwd.getpwnam(mail_owner).pw_uid
    except KeyError:
        owner_uid = None
    if entry.pw_uid == owner_uid:
        raise IdentityError("4.3.5", f"mail system configuration error: refusing to deliver as {entry.pw_name}, "
                                     "the mail_owner (it owns the queue)")
    return Identity(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)


def append_file(who: Identity, path: Path, copy: bytes, sender: str, lock: LockPolicy, timeout: float) -> None:
    """Append *copy* to the mbox *path* as *who*: in this process when we already
    are that user, else in a child started as that user.  Raises MailboxError
    (permanent), MailboxLocked or OSError (temporary), as ``deliver_mbox``."""
    spawn = who.spawn()
    if not spawn:
        deliver_mbox(path, copy, sender, lock, dotlock_may_fail=True)
        return
    argv = [sys.executable, "-m", "trimail.delivery.local.filewriter", str(who.uid), str(who.gid), str(path), sender,
            ",".join(lock.methods), str(lock.attempts), str(lock.delay), str(lock.stale)]
    try:  # started as root: the child imports, then becomes *who* itself before it writes
        result = subprocess.run(argv, input=copy, capture_output=True, timeout=timeout, cwd="/", check=False,
                                env={"PATH": "/usr/bin:/bin", "PYTHONPATH": _PACKAGE_ROOT})
    except subprocess.TimeoutExpired:
        raise OSError(f"writing {path} took longer than {timeout:g}s") from None
    text = result.stderr.decode("utf-8", "replace").strip()[-300:] or f"exit status {result.returncode}"
    if result.returncode == os.EX_OK:
        return
    if result.returncode == os.EX_TEMPFAIL:
        raise MailboxLocked(text)
    if result.returncode in (os.EX_DATAERR, os.EX_NOPERM, os.EX_CANTCREAT):
        raise MailboxError(text)
    raise OSError(text)
