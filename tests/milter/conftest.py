"""Helpers for the milter tests: a serve on 127.0.45.1 with milters configured, SMTP
sessions from a thread, the queue's view of a message."""

from __future__ import annotations

import smtplib
from dataclasses import dataclass

import pytest
import trio

from trimail.master import serve
from trimail.queue.store import Store

MESSAGE = ("From: Alice <alice@example.com>\r\nTo: bob@remote.example\r\nSubject: milter test\r\n"
           "Date: Wed, 02 Dec 2026 10:00:00 +0000\r\nMessage-ID: <m1@example.com>\r\n\r\n"
           "Hello Bob,\r\nthis is the body.\r\n")


@dataclass
class Result:
    """What one SMTP transaction got: the replies to MAIL, each RCPT, DATA's end."""

    mail: tuple[int, bytes]
    rcpts: list[tuple[int, bytes]]
    data: tuple[int, bytes] | None

    @property
    def queue_id(self) -> str:
        assert self.data is not None and self.data[0] == 250, self
        return self.data[1].decode().rsplit(" ", 1)[1]


def transaction(port: int, sender: str, recipients: list[str], message: str = MESSAGE,
                helo: str = "client.example") -> Result:
    with smtplib.SMTP("127.0.45.1", port, timeout=60) as client:
        client.ehlo(helo)
        mail = client.docmd("MAIL", f"FROM:<{sender}>")
        rcpts = [client.docmd("RCPT", f"TO:<{r}>") for r in recipients] if mail[0] == 250 else []
        data = None
        if any(code == 250 for code, _ in rcpts):
            code, text = client.docmd("DATA")
            if code == 354:
                body = smtplib.quotedata(message).encode()
                client.send(body + (b"" if body.endswith(b"\r\n") else b"\r\n") + b".\r\n")
                data = client.getreply()
            else:
                data = (code, text)
        return Result(mail, rcpts, data)


@pytest.fixture
async def start_serve(make_config, nursery):
    """A serve on 127.0.45.1 (mynetworks 127.0.0.0/8, no queue manager) with *params*,
    stopped at the end of the test."""
    started = []

    async def start(**params):
        settings = {"smtpd_listen": "127.0.45.1:0", "mynetworks": "127.0.0.0/8",
                    "mydestination": "mx.test.example"}
        settings.update(params)
        srv = await nursery.start(serve, make_config(**settings))
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


async def send(srv, sender: str, recipients: list[str], message: str = MESSAGE) -> Result:
    return await trio.to_thread.run_sync(transaction, srv.addresses[0].port, sender, recipients, message)


def stored(srv, queue_id: str) -> tuple[object, bytes]:
    """The queue's listing entry of *queue_id* and its content."""
    store = Store.open(srv.config.queue_directory, readonly=True)
    try:
        info = next(m for m in store.list_messages() if m.id == queue_id)
        return info, store.read_content(queue_id)
    finally:
        store.close()
