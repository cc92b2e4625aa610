"""Every example in docs/testing.md runs: plain blocks are executed, ``python test``
blocks are written out and run by pytest with two xdist workers."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "testing.md"
BLOCKS = re.findall(r"```python( test)?\n(.*?)```", DOC.read_text(), re.S)
SCRIPTS = [code for kind, code in BLOCKS if not kind]
SUITES = [code for kind, code in BLOCKS if kind]


def test_the_doc_has_examples():
    assert len(SCRIPTS) >= 5 and len(SUITES) >= 1


@pytest.mark.parametrize("code", SCRIPTS, ids=[f"example{i}" for i in range(len(SCRIPTS))])
def test_doc_example_runs(code):
    exec(compile(code, str(DOC), "exec"), {"__name__": "docs_example"})


def test_doc_pytest_suite_runs_under_xdist(tmp_path):
    for number, code in enumerate(SUITES):
        (tmp_path / f"test_doc_suite_{number}.py").write_text(code)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "-p", "xdist", str(tmp_path)],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"\b9 passed\b", result.stdout), result.stdout[-2000:]
