"""pytest plugin (entry point ``pytest11``): installing trimail is enough.

Fixtures:
- ``trimail_mta``: a fresh ``TestMTA`` per test; options from
  ``@pytest.mark.trimail(tls=True, auth={"u": "pw"}, ...)``.
- ``trimail_mta_session``: one ``TestMTA`` for the whole session, cleared before
  each test that uses it (faster when hundreds of tests send mail).
- ``trimail_trio_mta``: the trio form, for pytest-trio tests.
- ``trimail_async_mta``: an ``AsyncTestMTA`` (awaited waits) for async tests run by
  pytest-asyncio, anyio's plugin or pytest-trio; options from the marker.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from trimail.testing.mta import TrioTestMTA, open_test_mta
from trimail.testing.sync import TestMTA


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "trimail(**options): options for the trimail_mta fixtures "
                                       "(relay, transport, tls, auth, require_auth, require_tls, main.cf parameters)")


def _options(request: pytest.FixtureRequest) -> dict:
    marker = request.node.get_closest_marker("trimail")
    return dict(marker.kwargs) if marker else {}


@pytest.fixture
def trimail_mta(request: pytest.FixtureRequest) -> Iterator[TestMTA]:
    with TestMTA(**_options(request)) as mta:
        yield mta


@pytest.fixture(scope="session")
def trimail_mta_session() -> Iterator[TestMTA]:
    with TestMTA() as mta:
        yield mta


@pytest.fixture(autouse=True)
def _trimail_clear_session_mta(request: pytest.FixtureRequest) -> None:
    if "trimail_mta_session" in request.fixturenames:
        request.getfixturevalue("trimail_mta_session").clear()


@pytest.fixture
async def trimail_trio_mta(request: pytest.FixtureRequest) -> AsyncIterator[TrioTestMTA]:
    async with open_test_mta(**_options(request)) as mta:
        yield mta


# -- asyncio and anyio: AsyncTestMTA ----------------------------------------------------
# A plain (not async) fixture on purpose: the MTA runs in its own thread, so there is
# nothing to await to start it, and a plain fixture works whichever plugin runs the
# test - pytest-asyncio in strict or auto mode with any loop scope, anyio's plugin on
# either backend, pytest-trio - without importing any of them.  Only the waits, which
# run inside the test, are coroutines.


@pytest.fixture
def trimail_async_mta(request: pytest.FixtureRequest) -> Iterator[Any]:
    from trimail.testing.aio import AsyncTestMTA

    with AsyncTestMTA(**_options(request)) as mta:
        yield mta
