"""The local delivery agent (Postfix's local(8)): aliases, mailboxes, files, commands.

``LocalAgent.deliver()`` is synchronous (it writes files and may run a command)
and runs on a worker thread.  For each local recipient it checks for a mail loop
(a ``Delivered-To:`` header naming this recipient), expands aliases, and delivers
to every target: a local name's mailbox (Maildir or mbox under
``mail_spool_directory``, per ``home_mailbox``), an mbox ``/file``, a ``|command``
(``command``: no shell, a time limit, a minimal environment; of its output only the last
4 KiB is kept, for the bounce text) or a remote address, which is
collected and queued by the caller as a new message (Postfix logs it as
"forwarded as ID").  Each delivered copy starts with ``Return-Path:`` and
``Delivered-To:``.

The mail log (Postfix's local(8)): one line per final recipient, not one per
queued recipient: an alias expanded to local names or files logs
``to=<name@$myorigin>, orig_to=<alias@domain>`` for each (``Expanded.lines``),
and its remote targets are queued as one new message per queued recipient and
envelope sender, logged ``to=<alias@domain>, ... status=sent (forwarded as ID)``;
that message's own delivery lines carry ``orig_to=<alias@domain>``
(``ORIG_TO_PARAM``), so pflogsumm counts deliveries and forwards as for Postfix.

Identities (Postfix local(8), trimail.delivery.local.identity): mailboxes are written by
serve itself; ``/file`` and ``|command`` targets from the alias table run as
``default_privs``, those from an ``:include:`` file as its owner, with that
user's primary group as the only group - never as root, never as
``mail_owner``, never with root's supplementary groups.  That needs serve to be
root: a serve running as root (``allow_root = yes``) runs them itself; one that
runs as ``mail_owner`` hands them to the root helper it started before the
drop (trimail.delivery.local.roothelper), which expands the recipient again and runs
only targets its own expansion yields; without the helper they are deferred
(4.3.0), never run as ``mail_owner``.  ``allow_mail_to_files`` is
checked against the target's source (alias or include).  A target an unsafe
include file produced (``Target.refused``: group writable) is not delivered:
the other targets are, then the recipient bounces 5.3.5 with the reason.  A
file that the delivery's user may not write bounces 5.2.0 (Postfix's mbox_dsn).

Outcomes: temporary trouble (disk full, permissions, an unreadable include file,
an alias table that cannot be read, an mbox locked by a mail client for every
attempt, command exit status 75) defers the recipient; a loop, a bad target or a
failed command bounces it.  An unexpected error while delivering to one
recipient defers that recipient (4.3.0), is logged on one line and counted, and
the other recipients go on.  Mail is never dropped.

Threads: several deliveries run at once on worker threads; the alias tables are
shared between them and are thread-safe (``trimail.maps``), so a rebuild by
``newaliases`` while they run costs nothing.  Waiting for an mbox lock notices
a cancelled delivery (``trimail stop``) within a tenth of a second.

Parameters: myhostname, myorigin, alias_maps, mydestination, recipient_delimiter, mail_spool_directory,
home_mailbox, allow_mail_to_commands, allow_mail_to_files, command_time_limit,
default_privs, mail_owner, mailbox_delivery_lock, deliver_lock_attempts, deliver_lock_delay,
stale_lock_time.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
from pathlib import Path

from trimail import rewrite
from trimail.config import Config
from trimail.delivery.local import command, privileged
from trimail.delivery.local.aliases import AliasError, Expander, Target
from trimail.delivery.local.command import CommandFailed
from trimail.delivery.local.identity import Identity, IdentityError, append_file, identity
from trimail.delivery.local.mailbox import (
    LockPolicy,
    MailboxError,
    MailboxLocked,
    deliver_maildir,
    deliver_mbox,
    mailbox_path,
)
from trimail.delivery.outcome import Outcome, bounced, deferred, sent
from trimail.maps import Table, TableError, open_table
from trimail.supervise import report

log = logging.getLogger("trimail.local")

ORIG_TO_PARAM = "_ORIG_TO"  # message params key: the alias a forwarded copy was sent for (no esmtp-keyword has "_")


@dataclasses.dataclass(slots=True)
class Forward:
    """Remote targets of one recipient's aliases: queued by the caller as one new
    message (per recipient and envelope sender, as Postfix's forward.c)."""

    sender: str
    recipients: list[str]
    delivered_to: list[str]  # the local recipients whose aliases point here (loop detection)
    index: int = 0  # which of the delivery's recipients it is for
    orig_to: str = ""  # that recipient's address: the copy's recipients are logged with orig_to=<it>
    list_mail: bool = False  # sent as owner-<alias>: a new message of the list's, no orig_to (Postfix)


@dataclasses.dataclass(frozen=True, slots=True)
class Expanded(Outcome):
    """A local recipient's outcome, with what the log says about each final recipient
    its aliases led to: (to, outcome) pairs (the caller adds the forwards')."""

    lines: tuple[tuple[str, Outcome], ...] = ()


@dataclasses.dataclass(slots=True)
class LocalResult:
    outcomes: list[Outcome]
    forwards: list[Forward]


class LocalAgent:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.spool = Path(config.mail_spool_directory)
        self.home_mailbox: str = config.home_mailbox
        self.delimiter: str = config.recipient_delimiter
        self.myorigin: str = config.myorigin
        self.time_limit: float = config.command_time_limit
        self.allow_files = frozenset(config.allow_mail_to_files)
        self.rewrite = rewrite.Settings.from_config(config)
        self.mail_owner: str = config.mail_owner
        self.default_privs: str = config.default_privs
        self.lock = LockPolicy(tuple(config.mailbox_delivery_lock), config.deliver_lock_attempts,
                               config.deliver_lock_delay, config.stale_lock_time)
        self._tables: list[Table] | None = None
        self._tables_lock = threading.Lock()  # deliveries run on several threads at once

    def _expander(self) -> Expander:
        with self._tables_lock:
            if self._tables is None:
                self._tables = [open_table(ref, lazy=True) for ref in self.config.alias_maps]
        return Expander(self._tables, self.rewrite, self.delimiter,
                        frozenset(self.config.allow_mail_to_commands), self.default_privs)

    def deliver(self, sender: str, recipients: list[str], content: bytes) -> LocalResult:
        outcomes: list[Outcome] = []
        all_forwards: list[Forward] = []
        for index, recipient in enumerate(recipients):
            forwards: dict[str, Forward] = {}
            try:
                outcome = self._one(sender, recipient, content, forwards)
            except Exception as exc:  # noqa: BLE001 - the boundary of one recipient's delivery
                report("local delivery", exc, logger=log)
                outcome = deferred("4.3.0", "local delivery failed: internal error")
            outcomes.append(outcome)
            if outcome.status == "sent":  # Postfix's forward_finish: forwarded only when all else went well
                for forward in forwards.values():
                    forward.index, forward.orig_to = index, recipient
                    all_forwards.append(forward)
        return LocalResult(outcomes, all_forwards)

    def _one(self, sender: str, recipient: str, content: bytes, forwards: dict[str, Forward]) -> Outcome:
        local, _, domain = recipient.rpartition("@")
        if not local:
            local, domain = recipient, self.config.myhostname
        if _delivered_to(content, recipient):
            return bounced("5.4.6", f"mail forwarding loop for {recipient}")
        try:
            targets = self._expander().expand(local)
        except TableError as exc:
            return deferred("4.3.0", f"alias database unavailable: {exc}")
        except AliasError as exc:
            return (deferred if exc.dsn.startswith("4") else bounced)(exc.dsn, exc.text)
        headers = f"Return-Path: <{sender}>\r\nDelivered-To: {recipient.lower()}\r\n".encode()
        copy = headers + content
        done = []
        lines: list[tuple[str, Outcome]] = []  # what the log says, per final recipient
        top = local.lower()

        def final(target: Target) -> str:
            """The address a target is logged under: the alias or user it belongs to."""
            name = (target.via or top).lower()
            return recipient if name == top else f"{name}@{self.myorigin}"

        refused = [target for target in targets if target.refused]
        for target in targets:
            if target.refused:
                continue
            result = self._attempt(target, sender, recipient, domain, copy, forwards)
            if isinstance(result, Outcome):
                lines.append((final(target), result))
                return Expanded(result.status, result.dsn, result.text, tuple(lines))
            done.append(result)
            if target.kind != "remote":  # forwards are logged by the caller, once queued
                lines.append((final(target), sent(result)))
        if refused:
            log.warning("%s: %s", recipient, refused[0].refused)
            failure = bounced("5.3.5", "; ".join([*done, f"mail system configuration error: {refused[0].refused}"]))
            lines.append((final(refused[0]), bounced("5.3.5", f"mail system configuration error: "
                                                               f"{refused[0].refused}")))
            return Expanded(failure.status, failure.dsn, failure.text, tuple(lines))
        return Expanded("sent", "2.0.0", "; ".join(done) or "delivered", tuple(lines))

    def _attempt(self, target: Target, sender: str, recipient: str, domain: str, copy: bytes,
                 forwards: dict[str, Forward]) -> str | Outcome:
        """Deliver to one target: what to log, or the Outcome of its failure."""
        try:
            return self._target(target, sender, recipient, domain, copy, forwards)
        except IdentityError as exc:
            return (deferred if exc.dsn.startswith("4") else bounced)(exc.dsn, exc.text)
        except MailboxError as exc:
            return bounced("5.2.0" if target.kind == "file" else "5.3.5", str(exc))
        except MailboxLocked as exc:
            return deferred("4.2.0", str(exc))
        except OSError as exc:
            return deferred("4.3.0", f"cannot deliver to {target.kind} {target.value}: {exc.strerror or exc}")
        except CommandFailed as exc:
            return (deferred if exc.temporary else bounced)(exc.dsn, exc.text)

    def _identity(self, target: Target) -> Identity:
        return identity(target.uid, self.default_privs, self.mail_owner)

    def _via_helper(self, target: Target, who: Identity, sender: str, recipient: str, domain: str,
                    copy: bytes) -> str:
        """serve runs as mail_owner: the root helper (trimail.delivery.local.privileged)
        delivers to this /file or |command target, after expanding the
        recipient itself; without a helper, IdentityError (deferred)."""
        helper = privileged.helper()
        if helper is None:
            who.spawn()  # raises the IdentityError that says why
        assert helper is not None
        request = {"kind": target.kind, "value": target.value, "sender": sender, "recipient": recipient,
                   "domain": domain}
        try:
            answer = helper.run(request, copy)
        except privileged.HelperGone as exc:
            raise IdentityError("4.3.0", str(exc)) from None
        status, dsn, text = (str(answer.get(key, "")) for key in ("status", "dsn", "text"))
        if status == "sent":
            return text
        raise CommandFailed(status != "bounced", dsn if dsn[:1] in ("4", "5") else "4.3.0", text)

    def privileged(self, request: dict[str, object], copy: bytes) -> tuple[str, str, str]:
        """The root helper's side of ``_via_helper``: deliver to the target only if
        this recipient's own expansion here yields it; (status, dsn, text)."""
        fields = [request.get(key) for key in ("kind", "value", "sender", "recipient", "domain")]
        if not all(isinstance(field, str) for field in fields) or fields[0] not in ("file", "command"):
            return "bounced", "5.3.0", "malformed local delivery request"
        kind, value, sender, recipient, domain = (str(field) for field in fields)
        try:
            targets = self._expander().expand(recipient.rpartition("@")[0] or recipient)
        except TableError as exc:
            return "deferred", "4.3.0", f"alias database unavailable: {exc}"
        except AliasError as exc:
            return ("deferred" if exc.dsn.startswith("4") else "bounced"), exc.dsn, exc.text
        target = next((t for t in targets if (t.kind, t.value) == (kind, value) and not t.refused), None)
        if target is None:  # the tables changed since serve looked, or a forged request
            return "deferred", "4.3.0", f"{kind} {value} is not a target of {recipient} now"
        result = self._attempt(target, sender, recipient, domain, copy, {})
        if isinstance(result, Outcome):
            return result.status, result.dsn, result.text
        return "sent", "2.0.0", result

    def _target(self, target: Target, sender: str, recipient: str, domain: str, copy: bytes,
                forwards: dict[str, Forward]) -> str:
        if target.kind == "mailbox":
            user = target.value
            if self.delimiter and self.delimiter in user:
                user = user.split(self.delimiter, 1)[0]
            path, maildir = mailbox_path(self.spool, user.lower(), self.home_mailbox)
            if maildir:
                deliver_maildir(path, copy)
                return f"delivered to maildir {user}"
            try:
                deliver_mbox(path, copy, sender, self.lock)
            except MailboxLocked as exc:  # Postfix's words
                raise MailboxLocked(f"cannot update mailbox {path} for user {user}. {exc}") from None
            return f"delivered to mailbox {user}"
        if target.kind == "file":
            if target.source not in self.allow_files:
                raise MailboxError(f"mail to file is restricted by allow_mail_to_files: {target.value}")
            who = self._identity(target)
            if not who.can_become():
                return self._via_helper(target, who, sender, recipient, domain, copy)
            limit = max(60.0, self.lock.attempts * self.lock.delay * 1.5 + 30)
            try:
                append_file(who, Path(target.value), copy, sender, self.lock, limit)
            except MailboxLocked as exc:
                raise MailboxLocked(f"cannot append message to file {target.value}: {exc}") from None
            return f"delivered to file: {target.value}"
        if target.kind == "command":
            who = self._identity(target)
            if not who.can_become():
                return self._via_helper(target, who, sender, recipient, domain, copy)
            command.run(target.value, sender, recipient, domain, copy, who, self.time_limit)
            return f"delivered to command: {target.value}"
        owner = f"{target.owner}@{self.myorigin}" if target.owner else sender
        forward = forwards.setdefault(owner, Forward(owner, [], [], list_mail=bool(target.owner)))
        forward.recipients.append(target.value)
        if recipient.lower() not in forward.delivered_to:
            forward.delivered_to.append(recipient.lower())
        return f"forwarded to {target.value}"


def _delivered_to(content: bytes, recipient: str) -> bool:
    end = content.find(b"\r\n\r\n")
    header = content[: end if end >= 0 else 65536]
    wanted = recipient.lower().encode()
    return any(m.group(1).strip().lower() == wanted
               for m in re.finditer(rb"(?im)^delivered-to:[ \t]*(.*?)\r?$", header))
