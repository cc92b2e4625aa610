"""pytest plugin (entry point ``pytest11``): installing trimail is enough.

Fixtures:
- ``trimail_mta``: a fresh ``TestMTA`` per test; options from
  ``@pytest.mark.trimail(tls=True, auth={"u": "pw"}, ...)``.
- ``trimail_mta_session``: one ``TestMTA`` for the whole session, cleared before
  each test that uses it (faster when hundreds of tests send mail).
- ``trimail_trio_mta``: the trio form, for pytest-trio tests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from trimail.testing.mta import TrioTestMTA, open_test_mta
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
