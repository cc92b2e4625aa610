"""reject_unverified_recipient (Postfix verify(8)) end to end: a real serve probes the
internal server it relays to (a trio SMTP peer that knows one user and counts its
connections), caches the answer, and refuses what the probe says is undeliverable."""

from __future__ import annotations

import smtplib

import trio

from tests.conftest import wait_for
from tests.delivery.test_delivery import wait_empty
from tests.ports import free_port


class InternalServer:
    """A mail server that accepts RCPT for known@ only (550 5.1.1 for anyone else)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.connections = 0
        self.rcpts: list[str] = []
        self.delivered: list[str] = []
        self.port = 0
        self.gate: trio.Event | None = None  # when set: RCPT replies wait for it

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self.session, listeners)

    async def session(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        buffer = b""
        recipients: list[str] = []
        async with stream:
            await stream.send_all(b"220 internal.example ESMTP\r\n")
            in_data = False
            while True:
                while b"\r\n" not in buffer:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    buffer += chunk
                line, buffer = buffer.split(b"\r\n", 1)
                if in_data:
                    if line == b".":
                        in_data = False
                        self.delivered += recipients
                        await stream.send_all(b"250 2.0.0 Ok: queued\r\n")
                    continue
                verb = line[:4].upper()
                if verb == b"EHLO" or verb == b"HELO":
                    await stream.send_all(b"250-internal.example\r\n250 PIPELINING\r\n")
                elif verb == b"MAIL":
                    recipients = []
                    await stream.send_all(b"250 2.1.0 Ok\r\n")
                elif verb == b"RCPT":
                    address = line.decode().partition("<")[2].partition(">")[0]
                    self.rcpts.append(address)
                    if self.gate is not None:
                        await self.gate.wait()
                    if address.startswith("known@"):
                        recipients.append(address)
                        await stream.send_all(b"250 2.1.5 Ok\r\n")
                    else:
                        await stream.send_all(f"550 5.1.1 <{address}>: User unknown\r\n".encode())
                elif verb == b"DATA":
                    in_data = True
                    await stream.send_all(b"354 go ahead\r\n")
                elif verb == b"QUIT":
                    await stream.send_all(b"221 2.0.0 Bye\r\n")
                    return
                else:
                    await stream.send_all(b"250 2.0.0 Ok\r\n")


def rcpt_replies(port: int, rcpts: list[str], data: bool = False) -> list[tuple[int, str]]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.example")
        client.docmd("MAIL", "FROM:<a@client.example>")
        got = [client.docmd("RCPT", f"TO:<{r}>") for r in rcpts]
        if data and any(code == 250 for code, _ in got):
            client.docmd("DATA")
            client.send(b"Subject: verified\r\n\r\nhello\r\n.\r\n")
            client.getreply()
    return [(code, text.decode()) for code, text in got]


SETTINGS = {"mynetworks": "127.0.0.1/32", "smtpd_recipient_restrictions": "reject_unverified_recipient",
            "address_verify_poll_delay": "1s"}


async def test_known_user_verified_and_delivered_unknown_refused_from_the_cache(start_mta, nursery):
    peer = InternalServer()
    await nursery.start(peer.run)
    srv = await start_mta(relayhost=f"[127.0.0.1]:{peer.port}", unverified_recipient_reject_code="550", **SETTINGS)
    port = srv.addresses[0].port
    first = await trio.to_thread.run_sync(rcpt_replies, port, ["known@remote.example", "nobody@remote.example"],
                                          True)
    assert first[0][0] == 250
    assert first[1] == (550, ("5.1.1 <nobody@remote.example>: Recipient address rejected: undeliverable address: "
                              "host 127.0.0.1[127.0.0.1] said: 550 5.1.1 <nobody@remote.example>: User unknown "
                              "(in reply to RCPT TO command)"))
    await wait_empty(srv)
    await wait_for(lambda: peer.delivered == ["known@remote.example"])
    probes = peer.rcpts.count("nobody@remote.example")
    assert probes == 1
    connections = peer.connections
    again = await trio.to_thread.run_sync(rcpt_replies, port, ["nobody@remote.example", "known@remote.example"])
    assert again[0][0] == 550 and again[1][0] == 250
    assert peer.connections == connections  # both answers came from the cache: no new probe


async def test_default_reject_code_is_450_unverified(start_mta, nursery):
    peer = InternalServer()
    await nursery.start(peer.run)
    srv = await start_mta(master_service_disable="qmgr", relayhost=f"[127.0.0.1]:{peer.port}", **SETTINGS)
    got = await trio.to_thread.run_sync(rcpt_replies, srv.addresses[0].port, ["nobody@remote.example"])
    assert got[0][0] == 450
    assert got[0][1].startswith("4.1.1 <nobody@remote.example>: Recipient address rejected: unverified address: "
                                "host 127.0.0.1[127.0.0.1] said: 550 5.1.1")


async def test_concurrent_probes_for_one_address_coalesce(start_mta, nursery):
    peer = InternalServer()
    await nursery.start(peer.run)
    srv = await start_mta(master_service_disable="qmgr", relayhost=f"[127.0.0.1]:{peer.port}", **SETTINGS)
    results: list = []

    async def one() -> None:
        results.append(await trio.to_thread.run_sync(rcpt_replies, srv.addresses[0].port, ["nobody@remote.example"]))

    async with trio.open_nursery() as clients:
        for _ in range(4):
            clients.start_soon(one)
    assert [r[0][0] for r in results] == [450] * 4
    assert peer.rcpts.count("nobody@remote.example") == 1


async def test_internal_server_down_gives_450(start_mta):
    down = free_port()  # nothing listens there
    srv = await start_mta(master_service_disable="qmgr", relayhost=f"[127.0.0.1]:{down}", **SETTINGS)
    got = await trio.to_thread.run_sync(rcpt_replies, srv.addresses[0].port, ["someone@remote.example"])
    assert got[0][0] == 450
    assert got[0][1].startswith("4.1.1 <someone@remote.example>: Recipient address rejected: unverified address: ")


async def test_slow_probe_answers_in_progress_then_the_cache_answers(start_mta, nursery):
    peer = InternalServer()
    peer.gate = trio.Event()
    await nursery.start(peer.run)
    srv = await start_mta(master_service_disable="qmgr", relayhost=f"[127.0.0.1]:{peer.port}",
                          **{**SETTINGS, "address_verify_poll_count": "1"})
    port = srv.addresses[0].port
    got = await trio.to_thread.run_sync(rcpt_replies, port, ["slow@remote.example"])
    assert got == [(450, ("4.1.1 <slow@remote.example>: Recipient address rejected: unverified address: "
                          "Address verification in progress"))]
    peer.gate.set()  # the probe, still running, gets its answer and fills the cache

    async def from_cache() -> bool:
        replies = await trio.to_thread.run_sync(rcpt_replies, port, ["slow@remote.example"])
        return "said: 550 5.1.1" in replies[0][1]

    with trio.fail_after(10):  # queries meanwhile share the running probe: still one connection
        while not await from_cache():
            await trio.sleep(0.05)
    assert peer.connections == 1 and peer.rcpts == ["slow@remote.example"]
