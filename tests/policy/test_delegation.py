"""check_policy_service against a small policy server speaking Postfix's protocol."""

from __future__ import annotations

import socket

import pytest
import trio

from tests.peers import silent_server
from tests.policy.test_restrictions import D, converse
from tests.ports import free_port


class PolicyServer:
    """Answers DEFER for greylisted@..., REJECT for blocked@..., DUNNO otherwise."""

    def __init__(self) -> None:
        self.requests: list[dict[str, str]] = []

    async def handle(self, stream: trio.abc.Stream) -> None:
        async with stream:
            data = b""
            while b"\n\n" not in data:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                data += chunk
            attributes = dict(line.split("=", 1) for line in data.decode().split("\n") if "=" in line)
            self.requests.append(attributes)
            recipient = attributes.get("recipient", "")
            action = ("REJECT not welcome here" if recipient.startswith("blocked@") else
                      "DEFER_IF_PERMIT greylisted, try again" if recipient.startswith("greylisted@") else "DUNNO")
            await stream.send_all(f"action={action}\n\n".encode())

    async def run_tcp(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self.handle, listeners)

    async def run_unix(self, path: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(path)
        sock.listen(8)
        task_status.started()
        await trio.serve_listeners(self.handle, [trio.SocketListener(sock)])


async def conversation(srv, **talk):
    return await trio.to_thread.run_sync(lambda: converse(srv.addresses[0].port, **{**D, **talk}))


async def test_policy_service_over_tcp(start_mta, nursery):
    policy = PolicyServer()
    port = await nursery.start(policy.run_tcp)
    srv = await start_mta(master_service_disable="qmgr",
                          smtpd_recipient_restrictions=f"check_policy_service inet:127.0.0.1:{port}")
    assert await conversation(srv, rcpt="ok@good.example") == (250, "")
    assert await conversation(srv, rcpt="blocked@good.example") == (
        554, "5.7.1 <blocked@good.example>: Recipient address rejected: not welcome here")
    assert await conversation(srv, rcpt="greylisted@good.example") == (
        450, "4.7.1 <greylisted@good.example>: Recipient address rejected: greylisted, try again")
    first = policy.requests[0]
    assert first["request"] == "smtpd_access_policy" and first["protocol_state"] == "RCPT"
    assert first["client_address"] == "127.0.0.1" and first["sender"] == "a@good.example"
    assert first["recipient"] == "ok@good.example" and first["helo_name"] == "client.good.example"


async def test_policy_service_over_a_unix_socket(start_mta, nursery, tmp_path):
    policy = PolicyServer()
    path = str(tmp_path / "policy.sock")
    await nursery.start(policy.run_unix, path)
    srv = await start_mta(master_service_disable="qmgr",
                          smtpd_recipient_restrictions=f"check_policy_service unix:{path}")
    assert (await conversation(srv, rcpt="blocked@good.example"))[0] == 554


@pytest.mark.parametrize("default, expected", [
    (None, (451, "4.3.5 <r@good.example>: Recipient address rejected: Server configuration problem")),
    ("DUNNO", (250, "")),
])
async def test_policy_service_down_uses_the_default_action(start_mta, default, expected):
    dead_port = free_port()  # nothing listens there
    extra = {"smtpd_policy_service_default_action": default} if default else {}
    srv = await start_mta(master_service_disable="qmgr", **extra,
                          smtpd_recipient_restrictions=f"check_policy_service inet:127.0.0.1:{dead_port}")
    assert await conversation(srv) == expected


async def test_silent_policy_service_times_out(start_mta, nursery):
    port = await nursery.start(silent_server)
    srv = await start_mta(master_service_disable="qmgr", smtpd_policy_service_timeout="1s",
                          smtpd_recipient_restrictions=f"check_policy_service inet:127.0.0.1:{port}")
    assert (await conversation(srv))[0] == 451
