"""The embedded test MTA: a real trimail serve on an ephemeral loopback port.

Same protocol core, queue, policy and (in relay mode) scheduler as ``trimail
serve``; a temporary queue directory; nothing leaves the machine unless the test
asks for relaying.  ``TestMTABase`` holds everything both forms share: the
captured messages, matching, waiting, assertions and fault injection.  The trio
form is ``open_test_mta``; the synchronous form is ``TestMTA`` (in ``sync.py``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import getpass
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from trimail import config as configuration
from trimail.config import Config
from trimail.passwords import hash_password, write_table
from trimail.receive.hooks import AcceptedMessage, DropConnection, SessionHooks
from trimail.receive.session import SmtpdSession
from trimail.smtp.replies import Reply
from trimail.testing.content import MessageContent

STAGES = ("mail", "rcpt", "data", "end")


class CapturedMessage(AcceptedMessage, MessageContent):
    """One accepted message: envelope (``sender``, ``recipients``, ``params``),
    session facts (``client_address``, ``helo``, ``protocol``, ``tls``, ``auth``)
    and the content (``raw`` bytes; ``message``, ``headers``, ``text``, ``html``,
    ``attachments``, ``links``, ``extract()``, ``save()``: see content.py)."""

    @classmethod
    def of(cls, accepted: AcceptedMessage) -> CapturedMessage:
        return cls(*(getattr(accepted, field.name) for field in dataclasses.fields(accepted)))

    @property
    def auth(self) -> str | None:
        return self.sasl_username or None

    def __str__(self) -> str:
        return f"from=<{self.sender}> to={','.join(f'<{r}>' for r in self.recipients)} subject={self.subject!r}"


@dataclasses.dataclass(slots=True)
class Fault:
    stage: str
    reply: Reply | None  # None: drop the connection
    pattern: str | None = None  # fnmatch pattern on the sender (mail) or recipient (rcpt)
    remaining: int | None = None  # None: every time
    delay: float = 0.0


class _Hooks(SessionHooks):
    def __init__(self, owner: TestMTABase) -> None:
        self.owner = owner

    async def before(self, stage: str, session: SmtpdSession, address: str | None) -> Reply | None:
        fault = self.owner._match_fault(stage, address, session)
        if fault is None:
            return None
        if fault.delay:
            await trio.sleep(fault.delay)
        if fault.reply is None and fault.delay == 0.0:
            raise DropConnection
        return fault.reply

    def accepted(self, message: AcceptedMessage) -> None:
        self.owner._capture(CapturedMessage.of(message))


class MTAAssertionError(AssertionError):
    pass


class TestMTABase:
    """Captured mail and fault injection, shared by the trio and the sync forms."""

    __test__ = False  # not a test class, whatever pytest thinks of the name

    host: str = "127.0.0.1"
    port: int = 0

    def __init__(self) -> None:
        self.server: Any = None
        self.ca: Any = None
        self.directory: Path | None = None
        self._messages: list[CapturedMessage] = []
        self._faults: list[Fault] = []
        self._greylist: set[tuple[str, str, str]] | None = None
        self._lock = threading.Condition()

    # -- TLS for the client side ---------------------------------------------------

    @property
    def ca_file(self) -> str | None:
        """PEM file of the CA that signed the MTA's certificate (``tls=True``)."""
        if self.ca is None or self.directory is None:
            return None
        path = self.directory / "ca.pem"
        if not path.exists():
            self.ca.cert_pem.write_to_path(str(path))
        return str(path)

    def ssl_context(self) -> Any:
        """A client ``ssl.SSLContext`` that trusts the MTA's certificate."""
        import ssl

        ctx = ssl.create_default_context()
        if self.ca is not None:
            self.ca.configure_trust(ctx)
        return ctx

    # -- capture ---------------------------------------------------------------

    @property
    def messages(self) -> list[CapturedMessage]:
        with self._lock:
            return list(self._messages)

    def _capture(self, message: CapturedMessage) -> None:
        with self._lock:
            self._messages.append(message)
            self._lock.notify_all()

    def clear(self) -> None:
        """Forget captured messages and undo every fault injection."""
        with self._lock:
            self._messages.clear()
            self._faults.clear()
            self._greylist = None

    def matching(self, **match: Any) -> list[CapturedMessage]:
        return [m for m in self.messages if _matches(m, match)]

    def _check_wait(self, count: int, match: dict[str, Any]) -> list[CapturedMessage] | None:
        """The matching messages once there are *count* of them; ``exactly=n`` in
        *match* waits for n and fails as soon as more than n match."""
        criteria = {k: v for k, v in match.items() if k != "exactly"}
        found = self.matching(**criteria)
        exactly = match.get("exactly")
        if exactly is None:
            return found if len(found) >= count else None
        if len(found) > exactly:
            raise MTAAssertionError(self._explain(
                f"expected exactly {exactly} message(s) matching {criteria or 'anything'}, "
                f"{len(found)} matched"))
        return found if len(found) == exactly else None

    @staticmethod
    def _expected(count: int, timeout: float, match: dict[str, Any]) -> str:
        criteria = {k: v for k, v in match.items() if k != "exactly"}
        wanted = f"exactly {match['exactly']}" if match.get("exactly") is not None else str(count)
        return f"expected {wanted} message(s) matching {criteria or 'anything'} within {timeout:g}s"

    def _explain(self, what: str) -> str:
        arrived = self.messages
        lines = [what, f"{len(arrived)} message(s) arrived:"]
        lines += [f"  {m}" for m in arrived] or ["  (none)"]
        return "\n".join(lines)

    def wait_for_sync(self, count: int = 1, timeout: float = 5.0, **match: Any) -> list[CapturedMessage]:
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                found = self._check_wait(count, match)
                if found is not None:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise MTAAssertionError(self._explain(self._expected(count, timeout, match)))
                self._lock.wait(remaining)

    def assert_sent_to(self, *recipients: str, count: int | None = None) -> list[CapturedMessage]:
        found = [m for m in self.messages if all(r.lower() in (x.lower() for x in m.recipients) for r in recipients)]
        if not found or (count is not None and len(found) != count):
            raise MTAAssertionError(self._explain(
                f"expected {count if count is not None else 'some'} message(s) to {', '.join(recipients)}"))
        return found

    def assert_nothing_sent(self) -> None:
        if self.messages:
            raise MTAAssertionError(self._explain("expected no messages"))

    # -- fault injection ----------------------------------------------------------

    def _add(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def reject(self, *, rcpt: str | None = None, sender: str | None = None, stage: str | None = None,
               code: int = 550, text: str = "Rejected by the test MTA", enhanced: str | None = None,
               count: int | None = None) -> Fault:
        """Refuse a recipient (``rcpt`` pattern), a sender, or the ``data``/``end`` stage."""
        chosen = stage or ("rcpt" if rcpt else "mail" if sender else "data")
        if chosen not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}")
        klass = "4" if code < 500 else "5"
        default = {"mail": "1.0", "rcpt": "1.1", "data": "7.1", "end": "7.1"}[chosen]
        reply = Reply(code, enhanced or f"{klass}.{default}", text)
        return self._add(Fault(chosen, reply, rcpt or sender, count))

    def defer(self, *, rcpt: str | None = None, sender: str | None = None, stage: str | None = None,
              code: int = 451, text: str = "Try again later", count: int | None = None) -> Fault:
        return self.reject(rcpt=rcpt, sender=sender, stage=stage, code=code, text=text, count=count,
                           enhanced="4.7.1" if code != 452 else "4.5.3")

    def defer_next(self, count: int = 1, code: int = 451, text: str = "Try again later") -> Fault:
        """The next *count* messages are deferred at the end of DATA."""
        return self._add(Fault("end", Reply(code, "4.3.0", text), None, count))

    def drop(self, stage: str = "data", count: int | None = None) -> Fault:
        """Close the connection without a reply at *stage*."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}")
        return self._add(Fault(stage, None, None, count))

    def slow(self, seconds: float, stage: str = "rcpt") -> Fault:
        """Delay the reply at *stage* by *seconds*, then answer normally."""
        return self._add(Fault(stage, None, None, None, delay=seconds))

    def greylist(self) -> None:
        """Defer the first attempt of each (client, sender, recipient) triple with 450."""
        with self._lock:
            self._greylist = set()

    def _match_fault(self, stage: str, address: str | None, session: SmtpdSession) -> Fault | None:
        with self._lock:
            if stage == "rcpt" and self._greylist is not None and session.txn is not None:
                triple = (session.client_address, session.txn.sender.lower(), (address or "").lower())
                if triple not in self._greylist:
                    self._greylist.add(triple)
                    return Fault("rcpt", Reply(450, "4.7.1", f"<{address}>: Recipient address rejected: "
                                                             "Greylisted, try again later"))
            for fault in self._faults:
                if fault.stage != stage:
                    continue
                if fault.pattern is not None and not fnmatch.fnmatch((address or "").lower(), fault.pattern.lower()):
                    continue
                if fault.remaining is not None:
                    if fault.remaining <= 0:
                        continue
                    fault.remaining -= 1
                return fault
        return None


def _matches(message: CapturedMessage, match: dict[str, Any]) -> bool:
    for key, wanted in match.items():
        if key in ("recipient", "to"):
            if wanted.lower() not in (r.lower() for r in message.recipients):
                return False
        elif key in ("sender", "from_"):
            if message.sender.lower() != wanted.lower():
                return False
        elif key == "subject":
            if wanted not in message.subject:
                return False
        elif key == "header":
            name, value = wanted
            if value not in str(message.message.get(name, "")):
                return False
        elif key == "body":
            if wanted not in message.text and wanted not in message.html:
                return False
        elif key == "text":
            if wanted not in (message.text or message.html):  # an HTML-only message: its HTML
                return False
        elif key == "html":
            if wanted not in message.html:
                return False
        elif key == "attachment":
            if not any(wanted in (a.filename or "") for a in message.attachments):
                return False
        elif key == "predicate":
            if not wanted(message):
                return False
        else:
            raise TypeError(f"unknown match keyword {key!r}")
    return True


def build_config(directory: Path, *, relay: bool, transport: dict[str, str] | None, tls: bool,
                 auth: dict[str, str] | None, require_auth: bool, require_tls: bool,
                 extra: dict[str, Any]) -> tuple[Config, Any]:
    settings: dict[str, str] = {
        "myhostname": "trimail.test",
        "mydestination": "",
        "smtpd_listen": "127.0.0.1:0",
        "queue_directory": str(directory / "queue"),
        "mynetworks": "127.0.0.0/8 [::1]/128",
        "allow_root": "yes",
        "mail_owner": getpass.getuser(),
        "alias_maps": "",
        "alias_database": "",
        "local_recipient_maps": "",
        "graceful_timeout": "1s",
        "smtpd_client_connection_count_limit": "0",
        "master_service_disable": "" if relay else "qmgr",
        "smtpd_relay_restrictions": "permit_mynetworks, permit_sasl_authenticated, reject",
    }
    ca = None
    if transport:
        entries = ", ".join(f"{{ {k} = {v} }}" for k, v in transport.items())
        settings["transport_maps"] = f"inline:{{ {entries} }}"
    if tls:
        import trustme  # a test dependency, needed only for tls=True

        ca = trustme.CA()
        cert = directory / "cert.pem"
        ca.issue_cert("127.0.0.1", "localhost", "trimail.test").private_key_and_cert_chain_pem.write_to_path(str(cert))
        settings["smtpd_tls_cert_file"] = str(cert)
        settings["smtpd_tls_security_level"] = "encrypt" if require_tls else "may"
    if auth:
        passwords = directory / "sasl_passwd"
        write_table(passwords, {user: hash_password(pw) for user, pw in auth.items()})
        settings["smtpd_sasl_auth_enable"] = "yes"
        settings["smtpd_sasl_password_file"] = str(passwords)
        settings["smtpd_tls_auth_only"] = "yes" if tls else "no"
        if require_auth:
            settings["smtpd_relay_restrictions"] = "permit_sasl_authenticated, reject"
    settings.update({k: str(v) for k, v in extra.items()})
    path = directory / "main.cf"
    path.write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
    return configuration.load(path), ca


class TrioTestMTA(TestMTABase):
    """The trio form; see ``open_test_mta``."""

    async def wait_for(self, count: int = 1, timeout: float = 5.0, **match: Any) -> list[CapturedMessage]:
        with trio.move_on_after(timeout):
            while True:
                found = self._check_wait(count, match)
                if found is not None:
                    return found
                await trio.sleep(0.01)
        raise MTAAssertionError(self._explain(self._expected(count, timeout, match)))



@asynccontextmanager
async def open_test_mta(*, relay: bool = False, transport: dict[str, str] | None = None, tls: bool = False,
                        auth: dict[str, str] | None = None, require_auth: bool = False,
                        require_tls: bool = False, **config: Any) -> AsyncIterator[TrioTestMTA]:
    """``async with open_test_mta() as mta:`` — a real trimail for one trio test.

    ``relay=True`` (or a ``transport`` mapping such as ``{'example.com':
    'smtp:[127.0.0.1]:2626'}``) delivers accepted mail through the real scheduler;
    by default mail is only captured.  Other keyword arguments are main.cf
    parameters (``message_size_limit=10000``, ``smtpd_recipient_limit=5``, ...).
    """
    mta = TrioTestMTA()
    async with running(mta, relay=relay, transport=transport, tls=tls, auth=auth, require_auth=require_auth,
                       require_tls=require_tls, **config):
        yield mta


@asynccontextmanager
async def running(mta: TestMTABase, *, relay: bool, transport: dict[str, str] | None, tls: bool,
                  auth: dict[str, str] | None, require_auth: bool, require_tls: bool,
                  **config: Any) -> AsyncIterator[Any]:
    """Run serve for *mta* (hooks attached) in a temporary directory."""
    from trimail.master import serve

    directory = Path(tempfile.mkdtemp(prefix="trimail-test-"))
    mta.directory = directory  # type: ignore[attr-defined]
    try:
        cfg, mta.ca = build_config(directory, relay=relay or bool(transport),  # type: ignore[attr-defined]
                                   transport=transport, tls=tls, auth=auth, require_auth=require_auth,
                                   require_tls=require_tls, extra=config)
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve, cfg)
            hooks = _Hooks(mta)
            for context in server.contexts.values():
                context.hooks = hooks
            mta.server = server  # type: ignore[attr-defined]
            mta.port = server.addresses[0].port
            try:
                yield server
            finally:
                server.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
