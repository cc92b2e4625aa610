"""trimail.testing: a real MTA embedded in a test suite.

    from trimail.testing import TestMTA, open_test_mta
    from trimail.testing import AsyncTestMTA   # asyncio or trio, awaited waits (needs anyio)

See docs/testing.md.  The pytest plugin (fixtures ``trimail_mta`` and
``trimail_mta_session``, marker ``@pytest.mark.trimail(...)``) is registered
through the ``pytest11`` entry point.

The names are imported on first use (PEP 562): pytest imports the plugin,
``trimail.testing.plugin``, in every run where trimail is installed, and that must
not cost the import of the MTA.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trimail.testing.aio import AsyncTestMTA
    from trimail.testing.base import MTAAssertionError
    from trimail.testing.content import CapturedMessage
    from trimail.testing.faults import Fault
    from trimail.testing.mta import TrioTestMTA, open_test_mta
    from trimail.testing.observe import Attempt, Delivery, Exchange
    from trimail.testing.sync import TestMTA

_WHERE = {
    "AsyncTestMTA": "trimail.testing.aio",  # needs anyio, which the rest does not
    "Attempt": "trimail.testing.observe",
    "Delivery": "trimail.testing.observe",
    "Exchange": "trimail.testing.observe",
    "Fault": "trimail.testing.faults",
    "CapturedMessage": "trimail.testing.content",
    "MTAAssertionError": "trimail.testing.base",
    "TestMTA": "trimail.testing.sync",
    "TrioTestMTA": "trimail.testing.mta",
    "open_test_mta": "trimail.testing.mta",
}

__all__ = ["AsyncTestMTA", "Attempt", "CapturedMessage", "Delivery", "Exchange", "Fault", "MTAAssertionError", "TestMTA", "TrioTestMTA",
           "open_test_mta"]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'trimail.testing' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
