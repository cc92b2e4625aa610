"""The shop's mail tested with anyio's pytest plugin, on asyncio and on trio: the
same ``trimail_async_mta`` fixture, the same awaited waits."""

import anyio
import pytest

from shop import Smtp
from shop.accounts import send_password_reset

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


async def test_password_reset_mails_a_six_digit_code(trimail_async_mta):
    mta = trimail_async_mta
    await anyio.to_thread.run_sync(send_password_reset, Smtp(mta.host, mta.port), "ann@example.com")
    mail = await mta.wait_for_one(subject="Reset your password")
    assert len(mail.extract(r"code is (\d+)")) == 6


async def test_mail_sent_by_a_task_while_the_test_waits(trimail_async_mta):
    mta = trimail_async_mta
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(anyio.to_thread.run_sync, send_password_reset, Smtp(mta.host, mta.port), "bob@example.com")
        mail = await mta.wait_for_one(recipient="bob@example.com")
    assert mail.links[0].startswith("https://shop.example/reset?token=")
