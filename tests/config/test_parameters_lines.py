"""Each trimail module's docstring says which parameters it reads ("Parameters:").

The check reads every module under ``trimail/`` with ``ast`` and collects the
parameters it reads by a literal name:

- ``R.NAME`` where NAME is a registered parameter and R is a Config: a name
  ``config``, ``cfg`` or ``fresh`` (master.py's and supervisor.py's reloaded
  configuration), or anything ending in ``.config`` or ``["config"]``;
- ``R.get("NAME")``, ``R["NAME"]``, ``R.expand("NAME")``, ``R.raw("NAME")``,
  ``R.is_set("NAME")`` and ``R.where("NAME")`` on the same receivers.

A module that reads one must have a "Parameters:" paragraph in its docstring that
names it.  The paragraph may abbreviate: ``smtpd_*_restrictions`` (a glob),
``smtp_{helo,mail}_timeout`` (alternatives) and ``<transport>_...`` (any word)
match the names they cover.  Every name the paragraph gives (or a pattern it gives)
must be a registered parameter, so a renamed or removed parameter cannot stay in
a docstring.  Names it gives that the module does not read are allowed: a module
may document what its caller reads for it ("read by the caller", "through ...").

What the check cannot see, and the docstrings list by hand: names built at run
time (``config.get(f"{transport}_destination_concurrency_limit")`` in
scheduler/, ``config.get(f"smtp_{name}_timeout")`` in delivery/smtp.py, the
tables of delivery/virtual.py and unlisted.py looked up by a variable), a Config
under another name (``self.config`` passed on and read as ``settings.X`` after
being copied into a dataclass: the dataclass's module is the one that reads), and
parameters read by the code generated from the registry (``trimail/config/``
itself, whose modules say "Parameters: none").
"""

from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path

from trimail.config.registry import PARAMETERS

PACKAGE = Path(__file__).resolve().parents[2] / "trimail"
_CONFIG_NAMES = {"config", "cfg", "fresh"}
_METHODS = {"get", "expand", "raw", "is_set", "where"}


def _is_config(node: ast.expr) -> bool:
    if isinstance(node, ast.Name):
        return node.id in _CONFIG_NAMES
    if isinstance(node, ast.Attribute):
        return node.attr == "config"
    if isinstance(node, ast.Subscript):
        return isinstance(node.slice, ast.Constant) and node.slice.value == "config"
    return False


def reads(tree: ast.AST) -> set[str]:
    """The parameters *tree* reads by a literal name (see the module docstring)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in PARAMETERS and _is_config(node.value):
            found.add(node.attr)
        elif isinstance(node, ast.Subscript) and _is_config(node.value):
            key = node.slice
            if isinstance(key, ast.Constant) and key.value in PARAMETERS:
                found.add(key.value)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in _METHODS and _is_config(node.func.value) and node.args):
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and arg.value in PARAMETERS:
                found.add(arg.value)
    return found


_PARAGRAPH = re.compile(r"^Parameters(?: \([^)]*\))?:(.*?)(?:\n\s*\n|\Z)", re.DOTALL | re.MULTILINE)
_WORD = re.compile(r"[A-Za-z0-9_{},*<>]+")


def _expand_braces(word: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", word)
    if not m:
        return [word]
    return [out for option in m.group(1).split(",")
            for out in _expand_braces(word[:m.start()] + option + word[m.end():])]


def listed(docstring: str) -> tuple[set[str], list[str]] | None:
    """The parameters a docstring's "Parameters:" paragraph names, and the names
    (or patterns) in it that match no parameter; ``None`` without a paragraph."""
    m = _PARAGRAPH.search(docstring)
    if m is None:
        return None
    text = re.sub(r"``[^`]*\.[^`]*``", " ", m.group(1))  # ``module.function`` references are no names
    names: set[str] = set()
    unknown: list[str] = []
    for word in (w.strip(",") for w in _WORD.findall(text)):
        for candidate in _expand_braces(re.sub(r"<[a-z_]+>", "*", word)):
            if candidate in PARAMETERS:
                names.add(candidate)
                continue
            if ("_" not in candidate or candidate.endswith("_") or candidate.startswith(_RESTRICTIONS)
                    or not re.fullmatch(r"[a-z*][a-zA-Z0-9_*]*", candidate)):
                continue  # an English word, a prefix ("their smtp_ forms") or a restriction's name
            if "*" in candidate:
                matches = fnmatch.filter(PARAMETERS, candidate)
                names.update(matches)
                if not matches:
                    unknown.append(candidate)
            elif not _is_code_name(candidate):
                unknown.append(candidate)
    return names, unknown


def _is_code_name(word: str) -> bool:
    """Identifiers a Parameters paragraph may name besides parameters: functions
    and attributes of trimail's own code (``protocol_settings``, ``session_limit``)."""
    return word in _CODE_NAMES


_RESTRICTIONS = ("permit_", "reject_", "check_", "defer_", "warn_if_")
_CODE_NAMES = {"protocol_settings", "session_limit", "from_config", "local_recipient"}


def _modules() -> list[Path]:
    return sorted(path for path in PACKAGE.rglob("*.py") if "__pycache__" not in path.parts)


def test_every_module_lists_the_parameters_it_reads():
    problems = []
    for path in _modules():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        read = reads(tree)
        docstring = ast.get_docstring(tree) or ""
        found = listed(docstring)
        where = path.relative_to(PACKAGE.parent)
        if found is None:
            if read:
                problems.append(f"{where}: no 'Parameters:' line; reads {', '.join(sorted(read))}")
            continue
        names, unknown = found
        missing = sorted(read - names)
        if missing:
            problems.append(f"{where}: 'Parameters:' leaves out {', '.join(missing)}")
        if unknown:
            problems.append(f"{where}: 'Parameters:' names no parameter {', '.join(unknown)}")
    assert problems == [], "\n".join(problems)


def test_the_check_sees_each_way_of_reading():
    tree = ast.parse(
        "def f(config, cfg, ctx, fresh, current):\n"
        "    config.smtpd_timeout; cfg['myhostname']; ctx.config.get('mydomain'); fresh.relayhost\n"
        "    current['config'].expand('myorigin'); self.config.raw('mail_name')\n"
        "    settings.message_size_limit; config.get(name); config.not_a_parameter\n")
    assert reads(tree) == {"smtpd_timeout", "myhostname", "mydomain", "relayhost", "myorigin", "mail_name"}


def test_the_paragraph_may_abbreviate_and_must_name_real_parameters():
    names, unknown = listed(
        "Does a job.\n\nParameters: smtpd_*_restrictions, smtp_{helo,mail}_timeout,\n"
        "<transport>_destination_concurrency_limit and smtpd_tiemout (read by the caller).\n\nMore.")
    assert {"smtpd_client_restrictions", "smtp_helo_timeout", "smtp_mail_timeout",
            "smtp_destination_concurrency_limit"} <= names
    assert "smtpd_timeout" not in names and unknown == ["smtpd_tiemout"]
    assert listed("No such paragraph.") is None
