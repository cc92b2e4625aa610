"""trimail.testing: a real MTA embedded in a test suite.

    from trimail.testing import TestMTA, open_test_mta
    from trimail.testing import AsyncTestMTA   # asyncio or trio, awaited waits (needs anyio)

See docs/testing.md.  The pytest plugin (fixtures ``trimail_mta`` and
``trimail_mta_session``, marker ``@pytest.mark.trimail(...)``) is registered
through the ``pytest11`` entry point.
"""

from trimail.testing.base import MTAAssertionError
from trimail.testing.content import CapturedMessage
from trimail.testing.mta import TrioTestMTA, open_test_mta
from trimail.testing.sync import TestMTA

__all__ = ["AsyncTestMTA", "CapturedMessage", "MTAAssertionError", "TestMTA", "TrioTestMTA", "open_test_mta"]


def __getattr__(name: str) -> object:
    if name == "AsyncTestMTA":  # imported on first use: it needs anyio, the rest does not
        from trimail.testing.aio import AsyncTestMTA

        return AsyncTestMTA
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
