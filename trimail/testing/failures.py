"""The mail a failing test captured, kept as .eml files (the pytest plugin's
``--trimail-failures=DIR``): one folder per test, named after its node id made safe
for any file system, holding each captured message of each test MTA the test used
as a fixture (``NN-<queue id>.eml``; with more than one MTA, the fixture's name in
front).  A passing test writes nothing; a test's folder from an earlier run is
replaced."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

DEFAULT_DIRECTORY = ".trimail-failures"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_NAME_LIMIT = 150  # bytes of a folder name (file systems allow 255)
# folder -> node id, of the folders this process wrote: two ids made safe alike
# (``test[<a@b>]`` and ``test[a@b]``) must not replace each other's mail
_written: dict[str, str] = {}


def folder_name(nodeid: str) -> str:
    """*nodeid* as one safe folder name: ``tests/a.py::test_b[x y]`` -> ``tests_a.py_test_b_x_y``."""
    name = _UNSAFE.sub("_", nodeid).strip("._") or "test"
    if len(name) > _NAME_LIMIT:  # keep it unique: the start and a hash of the whole id
        import hashlib

        name = name[:_NAME_LIMIT - 13] + "-" + hashlib.sha1(nodeid.encode()).hexdigest()[:12]
    return name


def mtas_of(funcargs: dict[str, Any]) -> dict[str, Any]:
    """The test MTAs among a test's fixture values, by fixture name."""
    from trimail.testing.base import TestMTABase

    return {name: value for name, value in funcargs.items() if isinstance(value, TestMTABase)}


def save_failed_mail(directory: Path, nodeid: str, mtas: dict[str, Any]) -> list[Path]:
    """Write every message the *mtas* captured under *directory*/<test>/; the paths."""
    name = folder_name(nodeid)
    if _written.setdefault(name, nodeid) != nodeid:  # another test of this run has it: this id's hash too
        import hashlib

        name = f"{name[:_NAME_LIMIT - 13]}-{hashlib.sha1(nodeid.encode()).hexdigest()[:12]}"
    target = directory / name
    shutil.rmtree(target, ignore_errors=True)
    saved: list[Path] = []
    for fixture, mta in mtas.items():
        prefix = f"{fixture}-" if len(mtas) > 1 else ""
        for number, message in enumerate(mta.messages, 1):
            target.mkdir(parents=True, exist_ok=True)
            saved.append(message.save(target / f"{prefix}{number:02d}-{message.queue_id}.eml"))
    return saved
