"""The restriction registry is complete whatever module was imported first: it
loaded its handler modules only while it was empty, so importing
trimail.policy.verify first (one handler registered) left every other name unknown
and serve refused 'unknown restriction permit_mynetworks'."""

from __future__ import annotations

import subprocess
import sys


def test_importing_verify_first_leaves_the_registry_complete():
    code = ("import trimail.policy.verify\n"
            "from trimail.policy.engine import names\n"
            "assert {'permit_mynetworks', 'reject_unauth_destination', 'reject_unverified_recipient'} <= set(names())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
