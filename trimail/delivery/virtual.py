"""The virtual delivery agent (Postfix's virtual(8)): mailboxes of virtual mailbox domains.

``VirtualAgent.deliver()`` is synchronous and runs on a worker thread.  For each
recipient of a ``virtual_mailbox_domains`` domain (routed here by
``virtual_transport = virtual``) it looks up, as virtual(8) does, the address,
the address without its extension (``recipient_delimiter``) and ``@domain``:

- ``virtual_mailbox_maps`` gives the mailbox, relative to ``virtual_mailbox_base``:
  a path ending in ``/`` is a Maildir, anything else an mbox file (locked as
  ``mailbox_delivery_lock`` says);
- ``virtual_uid_maps`` and ``virtual_gid_maps`` give the owner (``static:N`` for
  every mailbox, or a table of numbers); a uid below ``virtual_minimum_uid`` is
  refused.

Outcomes: an address the mailbox table does not list bounces ``5.1.1 User unknown
in virtual mailbox table``; a table that cannot answer, a missing or bad uid/gid,
an unset base, a full disk or a locked mbox defer (4.3.x); a mailbox path that is
unsafe bounces ``5.3.5``.  Each copy starts with ``Return-Path:`` and
``Delivered-To:``; a copy that already carries this ``Delivered-To:`` is a loop
(5.4.6).

Security notes: the mailbox path from the table is checked before it is joined to
the base: relative, no ``..`` or empty component, no control character, bounded
length.  The write happens with the mailbox owner's privileges, never root's: when
serve runs as root, a forked child (one thread: the worker's) drops to the mapped
gid and uid with no supplementary groups before it creates or opens anything, and
reports through a pipe; so a link planted in a mailbox can only point where that
owner could write anyway.  When serve runs as mail_owner (after its privilege
drop) only mailboxes mapped to serve's own uid can be written; any other uid is
deferred as a configuration error (4.3.5).  The child has ``command_time_limit``.
Directories are created 0700 and checked not to be symlinks, files are opened
with ``O_NOFOLLOW`` (``trimail.local.mailbox``).  ``virtual_mailbox_base`` itself
must exist and be searchable by the owners.

Parameters: virtual_mailbox_base, virtual_mailbox_maps, virtual_uid_maps,
virtual_gid_maps, virtual_minimum_uid, recipient_delimiter, mailbox_delivery_lock,
deliver_lock_attempts, deliver_lock_delay, stale_lock_time, command_time_limit.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

from trimail.config import Config
from trimail.delivery.local import _delivered_to
from trimail.local.mailbox import (
    LockPolicy,
    MailboxError,
    MailboxLocked,
    _ensure_dir,
    deliver_maildir,
    deliver_mbox,
)
from trimail.maps import Table, TableError, lookup_first, open_table
from trimail.smtp.client import Outcome, bounced, deferred, sent
from trimail.supervise import report

EX_TEMPFAIL = 75  # the child's answers: deferred
EX_DATAERR = 65  # an unsafe mailbox: bounced
EX_LOCKED = 73  # an mbox locked for every attempt: deferred 4.2.0
MAX_PATH = 1024
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


class _Unsafe(Exception):
    """A mailbox path or owner that must never be used."""


def mailbox_relative(value: str) -> tuple[str, bool]:
    """(relative path, is_maildir) from a virtual_mailbox_maps result; _Unsafe if it
    is absolute, has a ``..`` or empty component or a control character."""
    maildir = value.endswith("/")
    path = value.rstrip("/")
    parts = path.split("/")
    if (not path or len(path) > MAX_PATH or value.startswith("/") or _UNSAFE.search(value)
            or any(part in ("", ".", "..") for part in parts)):
        raise _Unsafe(f"unsafe virtual mailbox path {value!r}")
    return path, maildir


def write_mailbox(base: Path, relative: str, maildir: bool, content: bytes, sender: str,
                  lock: LockPolicy) -> None:
    """Create the directories under *base* one by one (0700, never through a
    symlink) and deliver; runs with the mailbox owner's privileges."""
    parts = relative.split("/")
    where = base
    for part in parts[:-1] if not maildir else parts:
        where = where / part
        _ensure_dir(where)
    if maildir:
        deliver_maildir(where, content)
    else:
        deliver_mbox(where / parts[-1], content, sender, lock)


class VirtualAgent:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.base: str = config.virtual_mailbox_base
        self.delimiter: str = config.recipient_delimiter
        self.minimum_uid: int = config.virtual_minimum_uid
        self.time_limit: float = config.command_time_limit
        self.lock = LockPolicy(tuple(config.mailbox_delivery_lock), config.deliver_lock_attempts,
                               config.deliver_lock_delay, config.stale_lock_time)
        self._tables: dict[str, list[Table]] = {}
        self._tables_lock = threading.Lock()  # deliveries run on several threads at once

    def _maps(self, param: str) -> list[Table]:
        with self._tables_lock:
            if param not in self._tables:
                self._tables[param] = [open_table(ref, lazy=True) for ref in self.config.get(param)]
            return self._tables[param]

    def _find(self, param: str, recipient: str) -> str | None:
        local, _, domain = recipient.lower().rpartition("@")
        keys = [f"{local}@{domain}"]
        if self.delimiter and self.delimiter in local:
            keys.append(f"{local.split(self.delimiter, 1)[0]}@{domain}")
        keys.append(f"@{domain}")
        tables = self._maps(param)
        for key in keys:
            value = lookup_first(tables, key)
            if value is not None:
                return value.strip()
        return None

    def deliver(self, sender: str, recipients: list[str], content: bytes) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for recipient in recipients:
            try:
                outcomes.append(self._one(sender, recipient, content))
            except Exception as exc:  # the boundary of one recipient's delivery
                report("virtual delivery", exc)
                outcomes.append(deferred("4.3.0", "virtual delivery failed: internal error"))
        return outcomes

    def _one(self, sender: str, recipient: str, content: bytes) -> Outcome:
        if not self.base or not os.path.isabs(self.base):
            return deferred("4.3.5", "virtual mailbox delivery is not available: set virtual_mailbox_base "
                                     "to an absolute directory")
        if _delivered_to(content, recipient):
            return bounced("5.4.6", f"mail forwarding loop for {recipient}")
        try:
            mailbox = self._find("virtual_mailbox_maps", recipient)
            if mailbox is None:
                return bounced("5.1.1", "User unknown in virtual mailbox table")
            uid = self._owner("virtual_uid_maps", recipient)
            gid = self._owner("virtual_gid_maps", recipient)
        except TableError as exc:
            return deferred("4.3.0", f"virtual mailbox table unavailable: {exc}")
        except _Unsafe as exc:
            return deferred("4.3.5", f"mail system configuration error: {exc}")
        if uid < self.minimum_uid:
            return deferred("4.3.5", f"mail system configuration error: uid {uid} for {recipient} is below "
                                     f"virtual_minimum_uid ({self.minimum_uid})")
        try:
            relative, maildir = mailbox_relative(mailbox)
        except _Unsafe as exc:
            return bounced("5.3.5", str(exc))
        copy = f"Return-Path: <{sender}>\r\nDelivered-To: {recipient.lower()}\r\n".encode() + content
        what = f"{'maildir' if maildir else 'mailbox'} {relative}"
        return self._write(relative, maildir, copy, sender, uid, gid, what)

    def _owner(self, param: str, recipient: str) -> int:
        value = self._find(param, recipient)
        if value is None or not value.isdigit():
            raise _Unsafe(f"{param} gives no number for {recipient}: {value!r}")
        return int(value)

    def _write(self, relative: str, maildir: bool, copy: bytes, sender: str, uid: int, gid: int,
               what: str) -> Outcome:
        """Deliver with the owner's privileges: here when serve already runs as *uid*,
        else (as root) in a forked child that drops to uid/gid first."""
        base = Path(self.base)
        if os.geteuid() != 0:
            if uid != os.geteuid():
                return deferred("4.3.5", f"mail system configuration error: cannot deliver as uid {uid}")
            code, reason = _attempt(base, relative, maildir, copy, sender, self.lock)
        else:
            code, reason = self._as_owner(base, relative, maildir, copy, sender, uid, gid)
        if code == 0:
            return sent(f"delivered to {what}")
        if code == EX_DATAERR:
            return bounced("5.3.5", reason)
        return deferred("4.2.0" if code == EX_LOCKED else "4.3.0", f"cannot deliver to {what}: {reason}")

    def _as_owner(self, base: Path, relative: str, maildir: bool, copy: bytes, sender: str, uid: int,
                  gid: int) -> tuple[int, str]:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: one thread, drops root for good, writes, reports, exits
            code = EX_TEMPFAIL
            try:
                os.close(read_end)
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
                code, reason = _attempt(base, relative, maildir, copy, sender, self.lock)
                os.write(write_end, reason.encode("utf-8", "replace")[:400])
            finally:
                os._exit(code)
        os.close(write_end)
        try:
            deadline = time.monotonic() + self.time_limit
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    return EX_TEMPFAIL, "time limit exceeded"
                time.sleep(0.005)
            reason = os.read(read_end, 400).decode("utf-8", "replace")
        finally:
            os.close(read_end)
        code = os.waitstatus_to_exitcode(status)
        return (code, reason) if code in (0, EX_DATAERR, EX_LOCKED) else (EX_TEMPFAIL, reason or f"status {code}")


def _attempt(base: Path, relative: str, maildir: bool, copy: bytes, sender: str,
             lock: LockPolicy) -> tuple[int, str]:
    """(exit code, reason) of one write: 0, EX_DATAERR (bounce), EX_LOCKED or EX_TEMPFAIL."""
    try:
        write_mailbox(base, relative, maildir, copy, sender, lock)
    except MailboxError as exc:
        return EX_DATAERR, str(exc)
    except MailboxLocked as exc:
        return EX_LOCKED, f"mailbox locked: {exc}"
    except OSError as exc:
        return EX_TEMPFAIL, str(exc.strerror or exc)
    return 0, ""
