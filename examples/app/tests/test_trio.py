"""The shop's mail tested with the trio API (pytest-trio): the ``trimail_trio_mta``
fixture and ``open_test_mta``.  The app's blocking and asyncio code runs in threads."""

import asyncio

import pytest
import trio
from trimail.testing import open_test_mta

from shop import Smtp
from shop.accounts import send_password_reset
from shop.newsletter import send_newsletter

pytestmark = pytest.mark.trio


async def test_password_reset_mails_the_link(trimail_trio_mta):
    mta = trimail_trio_mta
    token = await trio.to_thread.run_sync(send_password_reset, Smtp(mta.host, mta.port), "ann@example.com")
    [mail] = await mta.wait_for(exactly=1, subject="Reset your password")
    assert f"https://shop.example/reset?token={token}" in mail.links


async def test_newsletter_is_sent_again_after_a_temporary_failure():
    async with open_test_mta() as mta:
        mta.defer_next(2)  # 451 for the next two messages: the app's third attempt goes through
        await trio.to_thread.run_sync(
            lambda: asyncio.run(send_newsletter(Smtp(mta.host, mta.port), "spring sale", ["ann@example.com"])))
        [mail] = await mta.wait_for(exactly=1, html="<h1>spring sale</h1>")
        assert mail.attachments[0].filename == "statement.pdf"
