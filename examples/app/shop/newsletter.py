"""The newsletter (aiosmtplib): text and HTML alternatives and a PDF, one mail per
subscriber, retried when the server answers 4xx; and the outbox, which sends from a
background task."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from email.message import EmailMessage

import aiosmtplib

from shop import Smtp
from shop.invoice import invoice_pdf

SENDER = "Shop news <news@shop.example>"
log = logging.getLogger(__name__)


def newsletter(issue: str, email: str) -> EmailMessage:
    mail = EmailMessage()
    mail["From"], mail["To"], mail["Subject"] = SENDER, email, f"Shop news: {issue}"
    mail.set_content(f"This month: {issue}.\nYour statement is attached.\n"
                     "Unsubscribe: https://shop.example/unsubscribe\n")
    mail.add_alternative(f"<h1>{issue}</h1><p>Your statement is attached.</p>"
                         '<p><a href="https://shop.example/unsubscribe">Unsubscribe</a></p>', subtype="html")
    mail.add_attachment(invoice_pdf("Shop statement", f"for {email}"), maintype="application",
                        subtype="pdf", filename="statement.pdf")
    return mail


async def send(smtp: Smtp, mail: EmailMessage, *, attempts: int = 3) -> None:
    """Send *mail*, again (up to *attempts* times) while the server answers 4xx."""
    for attempt in range(1, attempts + 1):
        try:
            await aiosmtplib.send(mail, hostname=smtp.host, port=smtp.port, timeout=30)
            return
        except aiosmtplib.SMTPResponseException as exc:
            if not 400 <= exc.code < 500 or attempt == attempts:
                raise


async def send_newsletter(smtp: Smtp, issue: str, subscribers: Iterable[str]) -> None:
    for email in subscribers:
        await send(smtp, newsletter(issue, email))


class Outbox:
    """Mail queued by request handlers and sent by one background task."""

    def __init__(self, smtp: Smtp) -> None:
        self.smtp = smtp
        self._queue: asyncio.Queue[EmailMessage] = asyncio.Queue()

    def put(self, mail: EmailMessage) -> None:
        self._queue.put_nowait(mail)

    async def drain(self) -> None:
        """Wait until everything put so far has been sent (or given up)."""
        await self._queue.join()

    async def run(self) -> None:
        while True:
            mail = await self._queue.get()
            try:
                await send(self.smtp, mail)
            except aiosmtplib.SMTPException:
                log.exception("mail to %s not sent", mail["To"])
            finally:
                self._queue.task_done()


@asynccontextmanager
async def running_outbox(smtp: Smtp) -> AsyncIterator[Outbox]:
    outbox = Outbox(smtp)
    task = asyncio.create_task(outbox.run())
    try:
        yield outbox
        await outbox.drain()  # a graceful stop sends what was queued
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def subscribe(outbox: Outbox, email: str) -> None:
    """The sign-up handler: answers at once, the welcome mail goes out in the background."""
    mail = EmailMessage()
    mail["From"], mail["To"], mail["Subject"] = SENDER, email, "Welcome to Shop news"
    mail.set_content("Thanks for subscribing. Unsubscribe: https://shop.example/unsubscribe\n")
    outbox.put(mail)
