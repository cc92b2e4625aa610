"""pytest plugin (entry point ``pytest11``): installing trimail is enough.

Fixtures:
- ``trimail_mta``: a fresh ``TestMTA`` per test; options from
  ``@pytest.mark.trimail(tls=True, auth={"u": "pw"}, ...)``.
- ``trimail_mta_session``: one ``TestMTA`` for the whole session, cleared before
  each test that uses it (faster when hundreds of tests send mail); mail from a
  transaction that began before the clear (sent late by an earlier test) is not
  captured.  It takes no per-test options: a test that uses it with
  ``@pytest.mark.trimail(...)`` fails and says to use ``trimail_mta``.
- ``trimail_trio_mta``: the trio form, for pytest-trio tests.
- ``trimail_async_mta``: an ``AsyncTestMTA`` (awaited waits) for async tests run by
  pytest-asyncio, anyio's plugin or pytest-trio; options from the marker.

The plugin is loaded by every pytest run in an environment where trimail is
installed, so importing it imports nothing of trimail's MTA (no trio, no
trimail.master): the fixtures import it when a test first uses one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from trimail.testing.mta import TrioTestMTA
    from trimail.testing.shared import SharedTestMTA
    from trimail.testing.sync import TestMTA


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("trimail").addoption(
        "--trimail-failures", metavar="DIR", default=".trimail-failures",
        help="where a failing test's captured mail is saved as .eml files, one folder per test "
             "(default: .trimail-failures; empty: not saved)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failing test that used a test MTA fixture: its captured mail as .eml files,
    named in a report section (trimail/testing/failures.py)."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    directory = item.config.getoption("--trimail-failures", default="")
    if not report.failed or not directory or report.when == "setup":
        return
    from trimail.testing.failures import mtas_of, save_failed_mail

    mtas = mtas_of(getattr(item, "funcargs", {}))
    if mtas:
        saved = save_failed_mail(item.config.invocation_params.dir / directory, item.nodeid, mtas)
        report.sections.append(("trimail captured mail", "\n".join(map(str, saved)) or "(no mail captured)"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "trimail(**options): options for the trimail_mta fixtures "
                                       "(relay, transport, tls, auth, require_auth, require_tls, main.cf parameters)")


def _options(request: pytest.FixtureRequest) -> dict[str, Any]:
    marker = request.node.get_closest_marker("trimail")
    if marker is None:
        return {}
    from trimail.testing.mta import check_options

    options = dict(marker.kwargs)
    try:
        check_options(options, "@pytest.mark.trimail(...)")
    except TypeError as exc:
        refused = str(exc)
    else:
        return options
    pytest.fail(refused, pytrace=False)


@pytest.fixture
def trimail_mta(request: pytest.FixtureRequest) -> Iterator[TestMTA]:
    from trimail.testing.sync import TestMTA

    with TestMTA(**_options(request)) as mta:
        yield mta


@pytest.fixture(scope="session")
def trimail_mta_session() -> Iterator[SharedTestMTA]:
    from trimail.testing.shared import SharedTestMTA

    with SharedTestMTA() as mta:
        yield mta


@pytest.fixture(autouse=True)
def _trimail_clear_session_mta(request: pytest.FixtureRequest) -> None:
    if "trimail_mta_session" not in request.fixturenames:
        return
    if request.node.get_closest_marker("trimail") is not None:
        pytest.fail("@pytest.mark.trimail(...) options do not apply to trimail_mta_session, which the whole "
                    "session shares: use the trimail_mta fixture for a test that needs its own options",
                    pytrace=False)
    request.getfixturevalue("trimail_mta_session").clear()


@pytest.fixture
async def trimail_trio_mta(request: pytest.FixtureRequest) -> AsyncIterator[TrioTestMTA]:
    from trimail.testing.mta import open_test_mta

    async with open_test_mta(**_options(request)) as mta:
        yield mta


# -- asyncio and anyio: AsyncTestMTA ----------------------------------------------------
# A plain (not async) fixture on purpose: the MTA runs in a background thread, so there is
# nothing to await to start it, and a plain fixture works whichever plugin runs the
# test - pytest-asyncio in strict or auto mode with any loop scope, anyio's plugin on
# either backend, pytest-trio - without importing any of them.  Only the waits, which
# run inside the test, are coroutines.


@pytest.fixture
def trimail_async_mta(request: pytest.FixtureRequest) -> Iterator[Any]:
    from trimail.testing.aio import AsyncTestMTA

    with AsyncTestMTA(**_options(request)) as mta:
        yield mta
