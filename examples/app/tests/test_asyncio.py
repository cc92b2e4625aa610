"""The shop's mail tested with the asyncio API (pytest-asyncio): the
``trimail_async_mta`` fixture and ``AsyncTestMTA``.  Awaited waits leave the event
loop running, so mail the app sends from a background task arrives while the test
waits (``TestMTA.wait_for`` would block the loop and starve that task)."""

import asyncio

import aiosmtplib
import pytest
from trimail.testing import AsyncTestMTA

from shop import Smtp
from shop.accounts import send_password_reset
from shop.newsletter import running_outbox, send_newsletter, subscribe

pytestmark = pytest.mark.asyncio


def smtp(mta):
    return Smtp(mta.host, mta.port)


async def test_the_welcome_mail_goes_out_from_the_background(trimail_async_mta):
    async with running_outbox(smtp(trimail_async_mta)) as outbox:
        await subscribe(outbox, "ann@example.com")  # returns before anything is sent
        mail = await trimail_async_mta.wait_for_one(subject="Welcome")
    assert mail.recipients == ["ann@example.com"] and mail.links == ["https://shop.example/unsubscribe"]


async def test_newsletter_with_the_context_manager():
    async with AsyncTestMTA() as mta:
        await send_newsletter(smtp(mta), "spring sale", ["ann@example.com", "bob@example.com"])
        mails = await mta.wait_for(exactly=2, html="<h1>spring sale</h1>", attachment=".pdf")
        assert {m.recipients[0] for m in mails} == {"ann@example.com", "bob@example.com"}


async def test_password_reset_from_async_code(trimail_async_mta):
    token = await asyncio.to_thread(send_password_reset, smtp(trimail_async_mta), "ann@example.com")
    mail = await trimail_async_mta.wait_for_one(recipient="ann@example.com")
    assert mail.extract(r"token=([\w-]+)") == token


@pytest.mark.trimail(message_size_limit=1000)
async def test_a_newsletter_too_big_for_the_server_is_refused(trimail_async_mta):
    with pytest.raises(aiosmtplib.SMTPResponseException) as refused:
        await send_newsletter(smtp(trimail_async_mta), "spring sale", ["ann@example.com"])
    assert refused.value.code == 552
    trimail_async_mta.assert_nothing_sent()
