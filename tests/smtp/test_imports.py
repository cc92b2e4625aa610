"""trimail/smtp/ is the protocol without I/O (h11's rule, STYLE.md section 1): its modules
import the standard library's pure parts, trimail.smtp itself and a pure codec, nothing
else: no trio, no socket or ssl, no storage, no other trimail package."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import trimail.smtp

PACKAGE = Path(trimail.smtp.__file__).parent

# standard-library modules that do I/O, run code elsewhere or keep process state
IO_MODULES = frozenset({
    "asyncio", "io", "os", "pathlib", "select", "selectors", "shutil", "signal", "socket", "socketserver",
    "sqlite3", "ssl", "subprocess", "tempfile", "threading", "multiprocessing", "concurrent", "time",
    "logging", "urllib", "http", "smtplib", "email", "dbm", "shelve", "pickle", "mmap", "fcntl",
})
THIRD_PARTY = frozenset({"idna"})  # a pure codec (address.py, IDNA host names)


def imported_modules(path: Path) -> list[str]:
    """Every module *path* imports, at any depth (imports inside functions count too)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside trimail.smtp unless it climbs out
                names.append("trimail.smtp" if node.level == 1 else "trimail")
            elif node.module != "__future__":
                names.append(node.module or "")
    return names


def forbidden(path: Path) -> list[str]:
    bad = []
    for name in imported_modules(path):
        top = name.partition(".")[0]
        if name == "trimail.smtp" or name.startswith("trimail.smtp."):
            continue
        if top in sys.stdlib_module_names and top not in IO_MODULES:
            continue
        if top in THIRD_PARTY:
            continue
        bad.append(name)
    return bad


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda p: p.name)
def test_smtp_modules_import_nothing_with_io_and_no_other_trimail_package(path):
    assert forbidden(path) == []


def test_the_import_rule_sees_what_it_forbids(tmp_path):
    module = tmp_path / "server.py"
    module.write_text("import trio\nimport socket as s\nfrom trimail.queue import store\nfrom .. import master\n"
                      "def late():\n    import apsw\nfrom trimail.smtp.replies import Reply\nimport re\n")
    assert forbidden(module) == ["trio", "socket", "trimail.queue", "trimail", "apsw"]


@pytest.mark.parametrize("name", ["server.py", "reader.py", "commands.py"])
def test_the_server_machine_builds_no_reply_inline(name):
    """Every reply the machine sends is a named value or function of replies.py (STYLE.md section 2)."""
    tree = ast.parse((PACKAGE / name).read_text())
    inline = [ast.unparse(node) for node in ast.walk(tree)
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Reply"]
    assert inline == []
