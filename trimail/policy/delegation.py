"""SMTP access policy delegation (Postfix's SMTPD_POLICY_README protocol).

``check_policy_service inet:host:port`` or ``unix:/path``: trimail sends
``name=value`` lines and an empty line; the policy server answers
``action=...`` and an empty line; the action is read as an access(5) result.
So existing policy daemons (postgrey, policyd-spf, ...) plug in unchanged.  Each
request has ``smtpd_policy_service_timeout``; when the service cannot be reached
or answers nonsense, the caller uses ``smtpd_policy_service_default_action``.
"""

from __future__ import annotations

import socket

import trio

from trimail.net.reading import receive_until

MAX_REPLY = 8192


class PolicyServiceError(Exception):
    pass


async def _connect(endpoint: str) -> trio.abc.Stream:
    kind, _, where = endpoint.partition(":")
    if kind == "inet":
        host, _, port = where.rpartition(":")
        return await trio.open_tcp_stream(host.strip("[]") or "127.0.0.1", int(port))
    if kind == "unix":
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(where)
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock)
    raise PolicyServiceError(f"unsupported policy service endpoint {endpoint!r} (use inet:host:port or unix:/path)")


async def ask_policy_service(endpoint: str, attributes: dict[str, str], timeout: float) -> str:
    request = "".join(f"{name}={_clean(value)}\n" for name, value in attributes.items()) + "\n"
    try:
        with trio.fail_after(timeout):
            stream = await _connect(endpoint)
            async with stream:
                await stream.send_all(request.encode("utf-8", "replace"))
                data = await receive_until(stream, b"\n\n", MAX_REPLY)
                if b"\n\n" not in data and len(data) >= MAX_REPLY:
                    raise PolicyServiceError("reply too long")
    except trio.TooSlowError:
        raise PolicyServiceError(f"no answer within {timeout:g}s") from None
    except (OSError, trio.BrokenResourceError, ValueError) as exc:
        raise PolicyServiceError(str(exc)) from None
    for line in data.decode("utf-8", "replace").split("\n"):
        name, sep, value = line.partition("=")
        if sep and name.strip() == "action":
            return value.strip()
    raise PolicyServiceError("reply without action=")


def _clean(value: str) -> str:
    return value.replace("\n", " ").replace("\r", " ")
