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
length.  The write happens with the mailbox owner's privileges, never root's: a
uid or gid 0 is always refused (4.3.5), whatever ``virtual_minimum_uid`` says,
and so is a uid below it (as Postfix's virtual(8)).  When serve runs as root
(``allow_root = yes``) each write is a fresh child program
(``trimail.delivery.local.filewriter --virtual``, started by ``subprocess``: never a
``fork()`` of this multi-threaded process, whose child would inherit locks other
threads held) that becomes the mapped uid and gid, with that gid as its only
group, before it reads the message or opens anything; so a link planted in a
mailbox can only point where that owner could write anyway.  When serve runs as
``mail_owner`` (production) a mailbox mapped to serve's own uid and gid is
written here; any other goes to the root helper started before the drop
(trimail.delivery.local.roothelper), which is sent only the sender, the recipient and the
message: it looks the recipient up again in its own tables (``privileged()``,
refusing a domain that is not a virtual mailbox domain), checks the path and the
owner itself and writes through the same child.  Without a helper such
deliveries are deferred (4.3.5), with a helper that is gone or does not answer
in time 4.3.0.  The child has ``command_time_limit``.  Directories are created
0700 and checked not to be symlinks, files are opened with ``O_NOFOLLOW``
(``trimail.delivery.local.mailbox``).  ``virtual_mailbox_base`` itself must exist and be
searchable by the owners.

Parameters: virtual_mailbox_base, virtual_mailbox_maps, virtual_uid_maps,
virtual_gid_maps, virtual_minimum_uid, virtual_mailbox_domains, recipient_delimiter,
mailbox_delivery_lock, deliver_lock_attempts, deliver_lock_delay, stale_lock_time,
command_time_limit.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

from trimail.config import Config
from trimail.delivery.local import privileged
from trimail.delivery.local.agent import _delivered_to
from trimail.delivery.local.filewriter import EX_DATAERR, EX_LOCKED, EX_TEMPFAIL, attempt
from trimail.delivery.local.mailbox import LockPolicy
from trimail.delivery.outcome import Outcome, bounced, deferred, sent
from trimail.maps import Table, TableError, lookup_first, open_table
from trimail.supervise import report

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # where this trimail is imported from
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


class VirtualAgent:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.base: str = config.virtual_mailbox_base
        self.delimiter: str = config.recipient_delimiter
        self.minimum_uid: int = config.virtual_minimum_uid
        self.time_limit: float = config.command_time_limit
        self.lock = LockPolicy(tuple(config.mailbox_delivery_lock), config.deliver_lock_attempts,
                               config.deliver_lock_delay, config.stale_lock_time)
        # the resolver's form of the list (trimail.rewrite: lower case, no trailing dot)
        self.domains = frozenset(d.lower().rstrip(".") for d in config.virtual_mailbox_domains)
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
            except Exception as exc:  # noqa: BLE001 - the boundary of one recipient's delivery
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
        if uid == 0 or gid == 0:
            return deferred("4.3.5", f"mail system configuration error: refusing to deliver as uid {uid} gid {gid} "
                                     f"for {recipient} (root)")
        if os.geteuid() != 0 and (uid, gid) != (os.geteuid(), os.getegid()):
            return self._via_helper(sender, recipient, content)
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
        else (as root) in a fresh child that drops to uid/gid first."""
        base = Path(self.base)
        if os.geteuid() == uid and os.getegid() == gid:
            code, reason = attempt(base, relative, maildir, copy, sender, self.lock)
        else:
            code, reason = self._as_owner(base, relative, maildir, copy, sender, uid, gid)
        if code == 0:
            return sent(f"delivered to {what}")
        if code == EX_DATAERR:
            return bounced("5.3.5", reason)
        return deferred("4.2.0" if code == EX_LOCKED else "4.3.0", f"cannot deliver to {what}: {reason}")

    def _as_owner(self, base: Path, relative: str, maildir: bool, copy: bytes, sender: str, uid: int,
                  gid: int) -> tuple[int, str]:
        """Run trimail.delivery.local.filewriter --virtual: a new process (no fork of this
        multi-threaded one) that becomes uid/gid before it opens anything."""
        argv = [sys.executable, "-m", "trimail.delivery.local.filewriter", "--virtual", str(uid), str(gid), str(base),
                relative, "1" if maildir else "0", sender, ",".join(self.lock.methods), str(self.lock.attempts),
                str(self.lock.delay), str(self.lock.stale)]
        try:
            result = subprocess.run(argv, input=copy, capture_output=True, timeout=self.time_limit, cwd="/",
                                    check=False, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": _PACKAGE_ROOT})
        except subprocess.TimeoutExpired:
            return EX_TEMPFAIL, "time limit exceeded"
        lines = result.stderr.decode("utf-8", "replace").strip().splitlines()
        reason = lines[-1][-400:] if lines else f"exit status {result.returncode}"
        code = result.returncode
        return (code, reason) if code in (0, EX_DATAERR, EX_LOCKED) else (EX_TEMPFAIL, reason)

    def _via_helper(self, sender: str, recipient: str, content: bytes) -> Outcome:
        """serve runs as mail_owner: the root helper looks the recipient up again
        in its own tables and writes as the owner it finds there."""
        helper = privileged.helper()
        if helper is None:
            return deferred("4.3.5", f"mail system configuration error: cannot deliver as another uid: serve runs "
                                     f"as uid {os.geteuid()}, not root, and has no root delivery helper")
        try:
            answer = helper.run({"kind": "virtual", "sender": sender, "recipient": recipient}, content)
        except privileged.HelperGone as exc:
            return deferred("4.3.0", str(exc))
        status, dsn, text = (str(answer.get(key, "")) for key in ("status", "dsn", "text"))
        if status == "sent":
            return sent(text)
        if status == "bounced" and dsn.startswith("5."):
            return bounced(dsn, text)
        return deferred(dsn if dsn.startswith("4.") else "4.3.0", text)

    def privileged(self, request: dict[str, object], content: bytes) -> tuple[str, str, str]:
        """The root helper's side of ``_via_helper``: only the sender, the recipient
        and the message come from serve; the rest is looked up here.  (status, dsn, text)"""
        sender, recipient = request.get("sender"), request.get("recipient")
        if not isinstance(sender, str) or not isinstance(recipient, str) or len(sender) + len(recipient) > 2048:
            return "bounced", "5.3.0", "malformed virtual delivery request"
        if recipient.rpartition("@")[2].lower().rstrip(".") not in self.domains:
            return "deferred", "4.3.0", f"{recipient} is not in a virtual mailbox domain"
        result = self._one(sender, recipient, content)
        return result.status, result.dsn, result.text
