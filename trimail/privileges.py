"""Least privilege: serve started as root binds its ports, then becomes ``mail_owner``.

``drop_privileges()`` refuses a missing or root ``mail_owner``, hands the queue
directory (0700) and its files (0600) to that user, clears supplementary groups,
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
from pathlib import Path


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
    """The queue directory and everything in it belongs to mail_owner, 0700/0600."""
    os.chown(queue_directory, uid, gid)
    os.chmod(queue_directory, 0o700)
    for root, dirs, files in os.walk(queue_directory):
        for name in dirs:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chown(path, uid, gid)
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path):
                continue
            os.chown(path, uid, gid)
            if os.stat(path).st_mode & 0o077 and not name.endswith(".sock") and name != "control":
                os.chmod(path, 0o600)


def preload() -> None:
    """Import now what serve would otherwise import lazily later: after the switch
    to mail_owner (and inside a chroot) the Python installation may be out of reach."""
    import encodings.idna  # noqa: F401  (dnspython's name codec)
    import importlib

    import dns.rdata
    import dns.rdataclass
    import dns.rdatatype

    for module in ("dns._trio_backend", "dns.asyncbackend", "dns.asyncquery", "dns.edns", "dns.flags",
                   "dns.message", "dns.nameserver", "dns.query", "dns.rcode", "dns.resolver", "dns.reversename",
                   "trimail.passwords", "trimail.local.aliases", "trimail.local.mailbox", "ssl", "subprocess",
                   "shlex", "email.utils", "email.policy"):
        importlib.import_module(module)
    for rdtype in ("A", "AAAA", "MX", "TXT", "PTR", "CNAME", "NS", "SOA", "OPT"):
        dns.rdata.get_rdata_class(dns.rdataclass.IN, dns.rdatatype.from_text(rdtype))


def drop_privileges(user: str, queue_directory: Path, chroot: bool) -> None:
    uid, gid = owner_ids(user)
    preload()
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
