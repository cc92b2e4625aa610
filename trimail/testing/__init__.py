"""trimail.testing: a real MTA embedded in a test suite.

    from trimail.testing import TestMTA, open_test_mta

See docs/testing.md.  The pytest plugin (fixtures ``trimail_mta`` and
``trimail_mta_session``, marker ``@pytest.mark.trimail(...)``) is registered
through the ``pytest11`` entry point.
"""

from trimail.testing.base import MTAAssertionError
from trimail.testing.content import CapturedMessage
from trimail.testing.faults import Fault
from trimail.testing.mta import TrioTestMTA, open_test_mta
from trimail.testing.observe import Attempt, Delivery, Exchange
from trimail.testing.sync import TestMTA

__all__ = ["Attempt", "CapturedMessage", "Delivery", "Exchange", "Fault", "MTAAssertionError", "TestMTA", "TrioTestMTA",
           "open_test_mta"]
