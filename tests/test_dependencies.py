"""Every third-party module trimail imports comes with ``pip install trimail``: a
distribution in pyproject's ``dependencies`` (or one they require), or, for
trimail.testing and trimail catch, in the ``testing`` extra.  A module that is
only in the test environment (cryptography came with trustme) must not decide
whether ``trimail serve`` starts after a plain install."""

from __future__ import annotations

import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

from tests.smtp.test_imports import imported_modules

ROOT = Path(__file__).resolve().parents[1]
EXTRA_PACKAGES = ("testing", "catch")  # trimail/testing/, trimail/catch/: the testing extra may be needed
LOADED_BY = {"trimail/testing/plugin.py": "pytest"}  # the pytest plugin is only ever imported by pytest


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _closure(names: list[str]) -> set[str]:
    """The distributions *names* install, with what they require (not their extras)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [_name(r) for r in requires if "extra ==" not in r]
    return seen


def test_every_third_party_import_is_a_declared_dependency() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = _closure([_name(r) for r in project["dependencies"]])
    testing = runtime | _closure([_name(r) for r in project["optional-dependencies"]["testing"]])
    providers = importlib.metadata.packages_distributions()
    missing = []
    for path in sorted((ROOT / "trimail").rglob("*.py")):
        part = path.relative_to(ROOT / "trimail").parts[0]
        allowed = testing if part in EXTRA_PACKAGES else runtime
        for module in imported_modules(path):
            top = module.partition(".")[0]
            if not top or top == "trimail" or top in sys.stdlib_module_names:
                continue
            if LOADED_BY.get(str(path.relative_to(ROOT))) == top:
                continue
            dists = {d.lower().replace("_", "-") for d in providers.get(top, [])}
            if not dists & allowed:
                missing.append(f"{path.relative_to(ROOT)}: {module} ({', '.join(sorted(dists)) or 'not installed'})")
    assert not missing, "imported but not declared in pyproject.toml:\n" + "\n".join(missing)
