"""The example application's own test suite (examples/app: smtplib and aiosmtplib
senders, text and HTML, a PDF) passes with the sync, trio, asyncio and anyio APIs:
a real pytest run in a subprocess, configured by the example's pytest.ini."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "examples" / "app"
EXPECTED = {"test_sync": 3, "test_trio": 2, "test_asyncio": 4, "test_anyio": 4}  # anyio: 2 tests x 2 backends


def test_the_example_apps_suite_passes_with_every_api(tmp_path):
    report = tmp_path / "junit.xml"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             f"--junitxml={report}"], check=False, capture_output=True, text=True,
                            timeout=300, cwd=APP, env=env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    cases = ET.parse(report).getroot().iter("testcase")
    outcomes = {(case.get("classname"), case.get("name")): [child.tag for child in case] for case in cases}
    assert all(not tags for tags in outcomes.values()), outcomes  # no failure, error or skip
    assert Counter(module.rsplit(".", 1)[-1] for module, _ in outcomes) == EXPECTED
