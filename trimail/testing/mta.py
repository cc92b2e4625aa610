"""The embedded test MTA: a real trimail serve on an ephemeral loopback port.

Same protocol core, queue, policy and (in relay mode) scheduler as ``trimail
serve``; a temporary queue directory; nothing leaves the machine unless the test
asks for relaying.  What both forms share is ``TestMTABase`` (base.py); the trio form
is ``open_test_mta`` here; the synchronous form is ``TestMTA`` (sync.py).

Parameters: master_service_disable (relay mode keeps the queue manager; what else
a test MTA sets is listed where its configuration is built).
"""

from __future__ import annotations

import difflib
import functools
import getpass
import math
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import trio

from trimail.config import Config
from trimail.testing import testmode
from trimail.testing.base import MTAAssertionError, T, TestMTABase
from trimail.testing.content import CapturedMessage
from trimail.testing.directories import new_directory, remove_directory
from trimail.testing.hooks import _Hooks
from trimail.testing.observe import Attempt, Delivery

OPTIONS = ("relay", "transport", "tls", "auth", "require_auth", "require_tls")
"""The test MTA's own options; every other keyword is a main.cf parameter."""


def check_options(config: dict[str, Any], where: str = "TestMTA()") -> None:
    """Refuse a keyword that is neither an option nor a main.cf parameter, with the
    closest name: a misspelt ``smtpd_recipent_limit=5`` must not be ignored."""
    from trimail.config.registry import PARAMETERS

    for name in config:
        if name not in PARAMETERS and name not in OPTIONS:
            close = difflib.get_close_matches(name, [*OPTIONS, *PARAMETERS], n=1, cutoff=0.75)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise TypeError(f"{where}: unknown option {name}{hint}; the options are {', '.join(OPTIONS)} "
                            "and main.cf parameters (trimail config)")


def user_name() -> str:
    """Who runs the tests (``mail_owner``): a uid without a passwd entry, as in many CI
    containers, is named by its number instead of failing in ``getpass.getuser``."""
    return _name_of(os.getuid())


@functools.cache  # once per uid: each lookup reads the passwd database
def _name_of(uid: int) -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # KeyError up to Python 3.12, OSError from 3.13
        return str(uid)


def loopback_of(host: str) -> str:
    """The address a client connects to for a listener on *host* (a wildcard
    listener is reached through the loopback address of its family)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def build_config(directory: str, *, relay: bool, transport: dict[str, str] | None, tls: bool,
                 auth: dict[str, str] | None, require_auth: bool, require_tls: bool,
                 extra: dict[str, Any]) -> tuple[Config, Any]:
    settings: dict[str, str] = {
        "myhostname": "trimail.test",
        "mydestination": "",
        "smtpd_listen": "127.0.0.1:0",
        "queue_directory": (queue := os.path.join(directory, "queue")),
        "mynetworks": "127.0.0.0/8 [::1]/128",
        "allow_root": "yes",
        "mail_owner": user_name(),
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
        ca, pem = testmode.tls_material(str(extra.get("smtpd_listen", settings["smtpd_listen"])))
        cert = os.path.join(directory, "cert.pem")
        testmode.write_private(cert, pem)
        settings["smtpd_tls_cert_file"] = cert
        settings["smtpd_tls_security_level"] = "encrypt" if require_tls else "may"
    if auth:
        passwords = os.path.join(directory, "sasl_passwd")
        testmode.write_private(passwords, testmode.password_table(auth))
        settings["smtpd_sasl_auth_enable"] = "yes"
        settings["smtpd_sasl_password_file"] = passwords
        settings["smtpd_tls_auth_only"] = "yes" if tls else "no"
        if require_auth:
            settings["smtpd_relay_restrictions"] = "permit_sasl_authenticated, reject"
    settings.update({k: str(v) for k, v in extra.items()})
    for name, value in settings.items():  # one line each: "a\nrelayhost = ..." would add parameters
        if "\n" in value or "\r" in value:
            raise ValueError(f"{name}: a main.cf value is one line, got {value!r}")
    if settings["queue_directory"] == queue:  # ours: test mode (testmode.py)
        testmode.new_queue(queue)
    path = os.path.join(directory, "main.cf")
    text = "".join(f"{k} = {v}\n" for k, v in settings.items())
    testmode.write_file(path, text.encode())
    return testmode.load_config(path, text, directory), ca


class TrioTestMTA(TestMTABase):
    """The trio form; see ``open_test_mta``."""

    async def wait_for(self, count: int = 1, timeout: float = 5.0, **match: Any) -> list[CapturedMessage]:
        return await self._until_async(lambda: self._check_wait(count, match), timeout,
                                       lambda: self._explain(self._expected(count, timeout, match), match))

    async def wait_for_one(self, timeout: float = 5.0, **match: Any) -> CapturedMessage:
        """The one message matching *match*; fails as soon as more than one match."""
        return await self._until_async(lambda: self._check_one(match), timeout,
                                       lambda: self._explain(self._expected(1, timeout, match), match))

    async def wait_for_attempts(self, count: int = 1, timeout: float = 5.0) -> list[Attempt]:
        """Wait until *count* SMTP sessions have ended; every ended one."""
        return await self._until_async(lambda: self._check_attempts(count), timeout,
                                       lambda: self._attempts_failure(count, timeout))

    async def wait_for_delivery(self, count: int = 1, timeout: float = 5.0, **match: Any) -> list[Delivery]:
        """Relay mode: wait until *count* delivery outcomes match (see TestMTA.wait_for_delivery)."""
        return await self._until_async(lambda: self._check_deliveries(count, match), timeout,
                                       lambda: self._deliveries_failure(count, timeout, match))

    def assert_nothing_sent(self, within: float = 0.0) -> Awaitable[None]:  # type: ignore[override]
        """Fail now if a message arrived; with *within*, ``await`` it: it keeps watching
        that many seconds and fails as soon as one arrives.  (Without *within* it may be
        called without ``await``, as in the sync form.)"""
        self._check_nothing()
        return self._nothing_within(within) if within > 0 else _DONE

    async def _nothing_within(self, within: float) -> None:
        with trio.move_on_after(within):
            await self._until_async(self._check_nothing, math.inf, str)

    async def _until_async(self, check: Callable[[], T | None], timeout: float, failure: Callable[[], str]) -> T:
        """*check* every 10 ms until it gives a result (or raises); fail with *failure()*
        after *timeout* seconds.  (The MTA runs in this event loop: it must never block.)"""
        with trio.move_on_after(timeout):
            while True:
                found = check()
                if found is not None:
                    return found
                await trio.sleep(0.01)
        found = check()
        if found is not None:
            return found
        raise MTAAssertionError(failure())


class _Done:
    """An awaitable that is already finished."""

    def __await__(self) -> Generator[None, None, None]:
        return iter(())  # type: ignore[return-value]


_DONE = _Done()


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
    check_options(config, "open_test_mta()")
    mta = TrioTestMTA()
    async with running(mta, relay=relay, transport=transport, tls=tls, auth=auth, require_auth=require_auth,
                       require_tls=require_tls, **config):
        yield mta


@asynccontextmanager
async def running(mta: TestMTABase, *, relay: bool, transport: dict[str, str] | None, tls: bool,
                  auth: dict[str, str] | None, require_auth: bool, require_tls: bool,
                  **config: Any) -> AsyncIterator[Any]:
    """Run serve for *mta* (hooks attached) in a temporary directory, removed when
    the block ends, however it ends (cancelled too)."""
    from trimail.master import serve

    with prepared(mta, relay=relay, transport=transport, tls=tls, auth=auth, require_auth=require_auth,
                  require_tls=require_tls, **config) as cfg:
        server = None
        try:
            async with trio.open_nursery() as nursery:
                server = await nursery.start(serve, cfg)
                attach(mta, server)
                try:
                    yield server
                finally:
                    server.stop()
        finally:
            if server is not None:
                detach(server)


@contextmanager
def prepared(mta: TestMTABase, *, relay: bool, transport: dict[str, str] | None, tls: bool,
             auth: dict[str, str] | None, require_auth: bool, require_tls: bool,
             **config: Any) -> Iterator[Config]:
    """*mta*'s temporary directory and the configuration of a serve in it; the
    directory is removed when the block ends, however it ends."""
    directory = new_directory()
    mta._directory = directory
    try:
        cfg, mta.ca = build_config(directory, relay=relay or bool(transport),  # type: ignore[attr-defined]
                                   transport=transport, tls=tls, auth=auth, require_auth=require_auth,
                                   require_tls=require_tls, extra=config)
        yield cfg
    finally:
        remove_directory(directory)


def attach(mta: TestMTABase, server: Any) -> None:
    """Once serve is ready: its sessions (and in relay mode its deliveries) report to *mta*."""
    hooks = getattr(mta, "hooks_class", _Hooks)(mta)
    for context in server.contexts.values():
        context.hooks = hooks
    mta.server = server  # type: ignore[attr-defined]
    if (manager := server.queue_manager) is not None:  # relay mode: mta.deliveries
        manager.results.observer = hooks.delivered
    mta.host = loopback_of(server.addresses[0].host)
    mta.port = server.addresses[0].port


def detach(server: Any) -> None:
    """Once serve has ended: the hooks go, and with them the cycle mta -> server -> mta."""
    for context in server.contexts.values():
        context.hooks = None
    if (manager := server.queue_manager) is not None:
        manager.results.observer = None
