"""``trimail catch``: a capturing MTA for test suites in any language, with
Mailpit's HTTP API v1 (the calls test clients use) and a small web page.

The SMTP side is trimail.testing's capturing test MTA (a real serve, temporary
queue, nothing delivered); its session hooks are ``chaos.CatchHooks``, which put
each accepted message in a bounded in-memory ``store.Mailbox`` and apply Mailpit's
chaos triggers.  The HTTP side is ``server.serve_http`` answering with
``api.Api`` (JSON) and ``page`` (HTML).  ``run`` starts both in one trio run;
``mime`` is the Mailpit view of one message.  See docs/catch.md.
"""

from __future__ import annotations

import sys
from typing import Any

import trio

from trimail.catch.api import Api
from trimail.catch.chaos import CatchHooks, Chaos
from trimail.catch.server import serve_http
from trimail.catch.store import Mailbox
from trimail.net.listener import ListenError


def split_address(value: str, what: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` (Mailpit's form); ValueError names *what*."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host or int(port) > 65535:
        raise ValueError(f"{what}: expected HOST:PORT, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


async def run(*, smtp: str = "127.0.0.1:1025", listen: str = "127.0.0.1:8025", max_messages: int = 500,
              enable_chaos: bool = False, chaos_seed: int | None = None, config: dict[str, Any] | None = None,
              task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Run the catcher until cancelled; ``task_status.started((smtp_port, http_port))``
    once both listeners are bound."""
    from trimail.testing.mta import TrioTestMTA, running

    smtp_host, smtp_port = split_address(smtp, "--smtp")
    http_host, http_port = split_address(listen, "--listen")
    mailbox = Mailbox(max_messages)
    chaos = Chaos(enable_chaos, chaos_seed)
    smtp_listen = f"[{smtp_host}]:{smtp_port}" if ":" in smtp_host else f"{smtp_host}:{smtp_port}"
    # the queue manager runs and discards every message once captured, so the queue on
    # disk stays as small as the mail in flight (the mailbox in memory is the only copy)
    settings = {"smtpd_listen": smtp_listen, "myhostname": "trimail-catch.test", "default_transport": "discard",
                "relay_transport": "discard", "local_transport": "discard", "virtual_transport": "discard",
                **(config or {})}
    mta = TrioTestMTA()
    async with running(mta, relay=True, transport=None, tls=False, auth=None, require_auth=False,
                       require_tls=False, **settings) as server:
        for context in server.contexts.values():
            context.hooks = CatchHooks(mailbox, chaos, context.hooks)
        try:
            listeners = await trio.open_tcp_listeners(http_port, host=http_host)
        except OSError as exc:  # one line for the operator, as serve's listeners say it
            raise ListenError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
        bound_http = listeners[0].socket.getsockname()[1]
        for extra in listeners[1:]:
            await extra.aclose()
        task_status.started((mta.port, bound_http))
        await serve_http(listeners[0], Api(mailbox, chaos))


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def run_until_signal(**options: Any) -> None:
    """``run`` until SIGTERM or SIGINT; one line on stdout says where it listens."""
    import signal

    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            smtp_port, http_port = await nursery.start(lambda task_status: run(task_status=task_status, **options))
            smtp_host = _url_host(split_address(options.get("smtp", "127.0.0.1:1025"), "--smtp")[0])
            http_host = _url_host(split_address(options.get("listen", "127.0.0.1:8025"), "--listen")[0])
            print(f"trimail catch: smtp {smtp_host}:{smtp_port} http http://{http_host}:{http_port}/", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break
    print("trimail catch: stopped", file=sys.stderr, flush=True)
