"""Least privilege: serve started as root binds its ports, then becomes ``mail_owner``.

``drop_privileges()`` refuses a missing or root ``mail_owner``, hands the queue
directory (0700) and its files (0600) to that user - except ``pid/``, which stays
root's - without following any symlink found there (mail_owner could have
planted it), clears supplementary groups,
and sets gid then uid; the change is permanent (real, effective and saved ids),
and a check afterwards makes sure root cannot be regained.

Optional ``chroot = yes`` first confines the process to ``queue_directory``.
Opened before the jail, and kept open across it: the listening sockets, the
control socket, the queue lock and database, the mail log (``maillog_file``,
``/dev/log``; trimail.log), and everything imported (``preload``).  Everything
serve opens later must live inside the jail, where ``queue_directory`` is ``/``
and paths in the configuration are taken relative to the jail: the queue's
reading connections, mailboxes, lookup tables and alias databases, the password
file, CA files, and DNS (set ``dns_nameservers``: ``/etc/resolv.conf`` is not
there).  As in Postfix, what is read again later must be inside the jail too:
``trimail reload`` re-reads ``main.cf``, so with it outside the jail a reload is
refused (one error line, serve keeps running with what it has) and a restart
applies changes; a TLS certificate that cannot be re-read is the one loaded at
start (one warning); a ``maillog_file`` outside the jail is written on but not
reopened after logrotate moves it.  ``trimail check`` (and
serve at start) warns about each such file.
"""
from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

from trimail.queue.lock import PID_DIRECTORY


class PrivilegeError(Exception):
    pass


def owner_ids(user: str) -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(f"mail_owner {user!r} does not exist; create the account or set mail_owner") from None
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise PrivilegeError(f"mail_owner {user!r} has root privileges; use an unprivileged account")
    return entry.pw_uid, entry.pw_gid


def hand_over(queue_directory: Path, uid: int, gid: int) -> None:
    """The queue directory and everything in it belongs to mail_owner, 0700/0600,
    except ``pid/`` (root's: the lock, trimail.queue.lock).

    This runs as root inside a directory mail_owner owns, so it never follows a
    symlink: the walk goes by directory descriptors (``os.fwalk`` without
    following links, so a directory swapped for a symlink mid-walk is not
    entered), ownership changes with ``lchown`` relative to the directory's
    descriptor, and a mode is changed only on a descriptor opened with
    ``O_NOFOLLOW`` that fstat shows to be a regular file (with one link: not a
    hard link to a file elsewhere) or a directory; a socket or FIFO is changed
    only when it has one link, through an ``O_PATH`` descriptor."""
    top = os.open(queue_directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fchown(top, uid, gid)
        os.fchmod(top, 0o700)
    finally:
        os.close(top)
    for root, dirs, files, root_fd in os.fwalk(queue_directory, follow_symlinks=False):
        if Path(root) == queue_directory and PID_DIRECTORY in dirs:
            dirs.remove(PID_DIRECTORY)
        for name in dirs:
            _hand_over_one(root_fd, name, uid, gid, None)
        for name in files:
            wanted = None if name.endswith(".sock") or name == "control" else 0o600
            _hand_over_one(root_fd, name, uid, gid, wanted)


def _hand_over_one(directory_fd: int, name: str, uid: int, gid: int, mode: int | None) -> None:
    """chown one entry of *directory_fd* (never through a symlink); tighten a
    regular file's mode to *mode* when it is looser."""
    try:
        st = os.stat(name, dir_fd=directory_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        return  # a link is nobody's business here, and its target is not ours to give away
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        _hand_over_special(directory_fd, name, uid, gid)  # sockets (the control socket), FIFOs
        return
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=directory_fd)
    except (FileNotFoundError, OSError):
        return  # gone, or replaced by a link or something else since the stat: not ours
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            return
        if stat.S_ISREG(st.st_mode) and st.st_nlink != 1:
            return  # a hard link to someone else's file (Postfix's safe_open: one link)
        os.fchown(fd, uid, gid)
        if mode is not None and stat.S_ISREG(st.st_mode) and st.st_mode & 0o077:
            os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _hand_over_special(directory_fd: int, name: str, uid: int, gid: int) -> None:
    """chown a socket or FIFO with one link: checked and changed through one
    ``O_PATH|O_NOFOLLOW`` descriptor (the inode checked is the inode changed),
    so a hard link to root's socket elsewhere planted in the queue is never
    given to mail_owner."""
    try:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory_fd)
    except OSError:
        return
    try:
        st = os.fstat(fd)
        if stat.S_ISLNK(st.st_mode) or stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode) or st.st_nlink != 1:
            return  # replaced since the stat, or a second name of someone else's socket
        try:
            os.chown(f"/proc/self/fd/{fd}", uid, gid)  # the magic link: this inode, whatever the name is now
        except FileNotFoundError:  # no /proc: by name, after the same check (a narrow race remains)
            again = os.stat(name, dir_fd=directory_fd, follow_symlinks=False)
            if (again.st_ino, again.st_dev, again.st_nlink) == (st.st_ino, st.st_dev, 1):
                os.chown(name, uid, gid, dir_fd=directory_fd, follow_symlinks=False)
    finally:
        os.close(fd)


def preload() -> None:
    """Import now what serve would otherwise import lazily later: after the switch
    to mail_owner (and inside a chroot) the Python installation may be out of reach."""
    import encodings.idna  # noqa: F401  (dnspython's name codec)
    import encodings.punycode  # noqa: F401  (an A-label's codec: smtp.address, idna)
    import importlib

    import dns.rdata
    import dns.rdataclass
    import dns.rdatatype

    for module in ("dns._trio_backend", "dns.asyncbackend", "dns.asyncquery", "dns.edns", "dns.flags",
                   "dns.message", "dns.nameserver", "dns.query", "dns.rcode", "dns.resolver", "dns.reversename",
                   "trimail.passwords", "trimail.delivery.local.aliases", "trimail.delivery.local.mailbox", "ssl", "subprocess",
                   "shlex", "email.utils", "email.policy",
                   "idna", "idna.uts46data"):  # idna imports its UTS 46 table at the first IDN domain
        importlib.import_module(module)
    for rdtype in ("A", "AAAA", "MX", "TXT", "PTR", "CNAME", "NS", "SOA", "OPT"):
        dns.rdata.get_rdata_class(dns.rdataclass.IN, dns.rdatatype.from_text(rdtype))


def drop_privileges(user: str, queue_directory: Path, chroot: bool, *, handed_over: bool = False) -> None:
    """Become *user* for good (entering the jail first with *chroot*); the queue
    directory is given to it first, unless the master did that already (*handed_over*)."""
    uid, gid = owner_ids(user)
    preload()
    if not handed_over:
        hand_over(queue_directory, uid, gid)
    if chroot:
        os.chroot(queue_directory)
        os.chdir("/")
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise PrivilegeError("still able to become root after dropping privileges")
