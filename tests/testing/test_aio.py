"""AsyncTestMTA: awaited waits that leave the event loop running, under asyncio, trio
and anyio, and the ``trimail_async_mta`` fixture under pytest-asyncio, anyio's plugin
and pytest-trio.

This suite runs in pytest-trio's trio mode (pyproject: ``trio_mode = true``), which
claims every ``async def`` test for trio.  So the trio tests here are plain ``async
def`` tests; the asyncio and anyio ones are plain ``def`` tests that call
``asyncio.run`` / ``anyio.run``; and the fixture tests write a test file and run it in
a pytest subprocess with its own ini file, where pytest-asyncio and anyio's plugin
see the tests their markers give them.
"""

from __future__ import annotations

import asyncio
import re
import smtplib
import subprocess
import sys
import textwrap
from pathlib import Path

import aiosmtplib
import anyio
import pytest
import trio

from trimail.testing import AsyncTestMTA, MTAAssertionError, TestMTA

LISTEN = "127.0.43.1:0"  # this file's loopback range
MAIL = "Subject: Welcome\r\n\r\nHello Ann, your code is 4242.\r\n"


def send(mta, subject="Welcome", to="ann@example.com"):
    """A blocking sender (smtplib): for threads."""
    with smtplib.SMTP(mta.host, mta.port, timeout=30) as client:
        client.sendmail("app@app.example", [to], f"Subject: {subject}\r\n\r\nx\r\n")


async def asend(mta, subject="Welcome", to="ann@example.com"):
    """The asyncio application's sender (aiosmtplib)."""
    await aiosmtplib.send(f"Subject: {subject}\r\n\r\nx\r\n", sender="app@app.example", recipients=[to],
                          hostname=mta.host, port=mta.port, timeout=30)


def test_the_blocking_wait_starves_a_background_asyncio_sender():
    """The problem AsyncTestMTA solves, shown with TestMTA.wait_for itself."""

    async def main():
        async with AsyncTestMTA(smtpd_listen=LISTEN) as mta:
            sender = asyncio.create_task(asend(mta))
            with pytest.raises(MTAAssertionError, match=r"0 message\(s\) arrived") as failure:
                TestMTA.wait_for(mta, timeout=0.5)  # blocks the loop: the task never runs
            assert "blocked the asyncio event loop" in str(failure.value)
            assert "AsyncTestMTA and `await mta.wait_for(...)`" in str(failure.value)
            await sender  # the loop runs again: the same task sends at once
            await mta.wait_for_one(subject="Welcome")

    asyncio.run(main())


def test_awaited_wait_lets_a_background_asyncio_sender_run():
    async def main():
        async with AsyncTestMTA(smtpd_listen=LISTEN) as mta:
            sender = asyncio.create_task(asend(mta))  # starts only once the test awaits
            message = await mta.wait_for_one(subject="Welcome", timeout=10)
            assert message.recipients == ["ann@example.com"]
            await sender  # captured before the 250 reply: the task is finishing now
            assert mta.host == "127.0.43.1"

    asyncio.run(main())


def test_start_and_stop_leave_the_loop_running():
    ticks = []

    async def ticker():
        while True:
            ticks.append(1)
            await asyncio.sleep(0)

    async def main():
        task = asyncio.create_task(ticker())
        mta = AsyncTestMTA(smtpd_listen=LISTEN)
        await mta.__aenter__()
        during_start = len(ticks)
        ticks.clear()
        await mta.__aexit__(None, None, None)
        during_stop = len(ticks)
        task.cancel()
        assert during_start > 0 and during_stop > 0

    asyncio.run(main())


def test_wait_for_one_returns_one_message_or_says_how_many_matched():
    async def main():
        async with AsyncTestMTA(smtpd_listen=LISTEN) as mta:
            await asend(mta, subject="Welcome")
            await asend(mta, subject="Welcome again", to="bob@example.com")
            await mta.wait_for(count=2)
            assert (await mta.wait_for_one(recipient="bob@example.com")).subject == "Welcome again"
            with pytest.raises(MTAAssertionError) as many:
                await mta.wait_for_one(subject="Welcome")
            assert "expected one message matching {'subject': 'Welcome'}, 2 matched" in str(many.value)
            with pytest.raises(MTAAssertionError) as none:
                await mta.wait_for_one(subject="Reset", timeout=0.2)
            assert "2 message(s) arrived" in str(none.value)
            with pytest.raises(MTAAssertionError, match="expected exactly 1 message"):
                await mta.wait_for(exactly=1, subject="Welcome")

    asyncio.run(main())


def test_a_failed_wait_explains_itself_as_the_sync_form_does():
    async def main():
        async with AsyncTestMTA(smtpd_listen=LISTEN) as mta:
            await asend(mta)
            await mta.wait_for()
            with pytest.raises(MTAAssertionError) as awaited:
                await mta.wait_for(subject="Reset", timeout=0.1)
            with pytest.raises(MTAAssertionError) as blocking:
                TestMTA.wait_for(mta, subject="Reset", timeout=0.1)
            assert str(blocking.value).startswith(str(awaited.value) + "\n(this wait blocked the asyncio")
            assert "subject='Welcome'" in str(awaited.value)
            return mta, str(awaited.value)

    mta, awaited = asyncio.run(main())
    with pytest.raises(MTAAssertionError) as outside_a_loop:  # no event loop here: no hint
        TestMTA.wait_for(mta, subject="Reset", timeout=0.1)
    assert str(outside_a_loop.value) == awaited


def test_tls_and_auth_with_aiosmtplib():
    async def main():
        async with AsyncTestMTA(smtpd_listen=LISTEN, tls=True, auth={"app": "secret"}, require_auth=True) as mta:
            client = aiosmtplib.SMTP(hostname=mta.host, port=mta.port, start_tls=False)
            async with client:
                await client.starttls(tls_context=mta.ssl_context(), server_hostname="trimail.test")
                await client.login("app", "secret")
                await client.sendmail("app@app.example", ["ann@example.com"], "Subject: secure\r\n\r\nx\r\n")
            message = await mta.wait_for_one(subject="secure")
            assert message.auth == "app" and message.tls.startswith("TLSv1.")

    asyncio.run(main())


def test_options_and_faults_are_test_mtas():
    async def main():
        async with AsyncTestMTA(smtpd_listen=LISTEN, message_size_limit=10_000) as mta:
            mta.reject(rcpt="bounce@*", code=550, text="No such user")
            with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
                await asend(mta, to="bounce@example.com")
            with pytest.raises(aiosmtplib.SMTPResponseException) as too_big:
                await aiosmtplib.send("Subject: big\r\n\r\n" + "x" * 20_000, sender="a@app.example",
                                      recipients=["ann@example.com"], hostname=mta.host, port=mta.port)
            assert too_big.value.code == 552
            mta.assert_nothing_sent()

    asyncio.run(main())


def test_a_cancelled_wait_leaves_nothing_behind():
    async def main():
        async with AsyncTestMTA(smtpd_listen=LISTEN) as mta:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.1):
                    await mta.wait_for(timeout=30)
            assert not mta._waiters
            await asend(mta)
            await mta.wait_for()

    asyncio.run(main())


async def test_under_trio_a_background_task_sends_while_the_test_awaits():
    async with AsyncTestMTA(smtpd_listen=LISTEN) as mta:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, send, mta)
            message = await mta.wait_for_one(subject="Welcome", timeout=10)
        assert message.recipients == ["ann@example.com"]
        with trio.move_on_after(0.1) as scope:
            await mta.wait_for(subject="never")
        assert scope.cancelled_caught and not mta._waiters
        with pytest.raises(MTAAssertionError, match=r"1 message\(s\) arrived"):
            await mta.wait_for(subject="never", timeout=0.1)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_under_anyio_on_either_backend(backend):
    async def main():
        async with AsyncTestMTA(smtpd_listen=LISTEN) as mta, anyio.create_task_group() as group:
            group.start_soon(anyio.to_thread.run_sync, send, mta)
            assert (await mta.wait_for_one(timeout=10)).subject == "Welcome"

    anyio.run(main, backend=backend)


def test_the_module_attribute_is_the_class():
    import trimail.testing
    from trimail.testing.aio import AsyncTestMTA as direct

    assert trimail.testing.AsyncTestMTA is direct
    with pytest.raises(AttributeError):
        trimail.testing.NoSuchThing  # noqa: B018


FIXTURE_SUITE = '''
import asyncio

import aiosmtplib
import anyio
import pytest
import pytest_asyncio
import trio

LISTEN = "127.0.43.2:0"
pytestmark = pytest.mark.trimail(smtpd_listen=LISTEN)


async def asend(mta, subject):
    await aiosmtplib.send(f"Subject: {subject}\\r\\n\\r\\nx\\r\\n", sender="app@app.example",
                          recipients=["ann@example.com"], hostname=mta.host, port=mta.port)


@pytest.mark.asyncio
async def test_pytest_asyncio(trimail_async_mta):
    task = asyncio.create_task(asend(trimail_async_mta, "from a task"))
    assert (await trimail_async_mta.wait_for_one()).subject == "from a task"
    await task


@pytest_asyncio.fixture
async def app(trimail_async_mta):
    yield trimail_async_mta


@pytest.mark.asyncio
async def test_pytest_asyncio_async_fixture_on_top(app):
    await asend(app, "via an app fixture")
    await app.wait_for_one(subject="via an app fixture")


@pytest.mark.trimail(smtpd_listen=LISTEN, smtpd_banner="$myhostname ESMTP marked")
@pytest.mark.asyncio
async def test_marker_options(trimail_async_mta):
    smtp = aiosmtplib.SMTP(hostname=trimail_async_mta.host, port=trimail_async_mta.port)
    reply = await smtp.connect()
    await smtp.quit()
    assert "ESMTP marked" in reply.message


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


@pytest.mark.anyio
async def test_anyio_plugin(trimail_async_mta):
    async with anyio.create_task_group() as group:
        group.start_soon(anyio.to_thread.run_sync, send_blocking, trimail_async_mta)
        assert (await trimail_async_mta.wait_for_one()).subject == "blocking"


@pytest.mark.trio
async def test_pytest_trio(trimail_async_mta):
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, send_blocking, trimail_async_mta)
        await trimail_async_mta.wait_for_one(subject="blocking")


def send_blocking(mta):
    import smtplib

    with smtplib.SMTP(mta.host, mta.port) as client:
        client.sendmail("app@app.example", ["ann@example.com"], "Subject: blocking\\r\\n\\r\\nx\\r\\n")
'''

INI = """[pytest]
asyncio_mode = strict
asyncio_default_fixture_loop_scope = function
"""


def run_pytest(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """A real pytest run in *directory*, configured by its own ini file (not this repo's
    pyproject, whose trio mode would claim the asyncio tests)."""
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c",
                           str(directory / "pytest.ini"), "--rootdir", str(directory), *args],
                          check=False, capture_output=True, text=True, timeout=300, cwd=directory)


def test_the_async_fixture_under_pytest_asyncio_anyio_and_pytest_trio(tmp_path):
    (tmp_path / "pytest.ini").write_text(INI)
    (tmp_path / "test_fixture_suite.py").write_text(textwrap.dedent(FIXTURE_SUITE))
    result = run_pytest(tmp_path, "-W", "error::pytest.PytestUnraisableExceptionWarning")
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert re.fullmatch(r"6 passed in [\d.]+s", summary), summary


AUTO_SUITE = """
import asyncio

import aiosmtplib
import pytest

pytestmark = pytest.mark.trimail(smtpd_listen="127.0.43.3:0")


@pytest.fixture
async def app(trimail_async_mta):  # auto mode: an unmarked async fixture is asyncio's
    yield trimail_async_mta


@pytest.mark.parametrize("n", range(2))
async def test_unmarked_async_test(app, n):  # auto mode: an unmarked async test is asyncio's
    task = asyncio.create_task(aiosmtplib.send("Subject: auto\\r\\n\\r\\nx\\r\\n", sender="a@app.example",
                                               recipients=["b@example.com"], hostname=app.host, port=app.port))
    await app.wait_for_one(subject="auto")
    await task


@pytest.mark.asyncio(loop_scope="module")  # a longer-lived loop: the fixture does not care
async def test_module_scoped_loop(trimail_async_mta):
    await aiosmtplib.send("Subject: module\\r\\n\\r\\nx\\r\\n", sender="a@app.example",
                          recipients=["b@example.com"], hostname=trimail_async_mta.host, port=trimail_async_mta.port)
    await trimail_async_mta.wait_for_one(subject="module")
"""


def test_the_async_fixture_under_pytest_asyncio_auto_mode(tmp_path):
    (tmp_path / "pytest.ini").write_text(INI.replace("strict", "auto"))
    (tmp_path / "test_auto_suite.py").write_text(textwrap.dedent(AUTO_SUITE))
    result = run_pytest(tmp_path, "-p", "no:trio", "-p", "no:anyio")
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert re.fullmatch(r"3 passed in [\d.]+s", summary), summary


def test_sessions_deliveries_and_nothing_sent_are_awaited_too():
    async def main():
        async with AsyncTestMTA(smtpd_listen="127.0.43.4:0") as downstream, \
                AsyncTestMTA(smtpd_listen=LISTEN, transport={"example.com": f"smtp:[127.0.43.4]:{downstream.port}"},
                             minimal_backoff_time="1s") as gateway:
            downstream.reject(rcpt="gone@*", code=550, text="No such user")
            await asend(gateway, to="ann@example.com")
            await asend(gateway, to="gone@example.com")
            # by recipient: the bounce notification to app@app.example may bounce too (no such domain)
            [sent] = await gateway.wait_for_delivery(status="sent", recipient="ann@example.com", timeout=10)
            [bounced] = await gateway.wait_for_delivery(status="bounced", recipient="gone@example.com", timeout=10)
            assert (sent.dsn[:2], bounced.dsn[:2]) == ("2.", "5.")
            assert len(await gateway.wait_for_attempts(2)) >= 2
            downstream.clear()
            sender = asyncio.create_task(asend(downstream, subject="late"))
            with pytest.raises(MTAAssertionError, match="expected no messages"):
                await downstream.assert_nothing_sent(within=10)  # fails at the arrival, long before 10 s
            await sender

    asyncio.run(main())
