"""main.cf syntax: logical lines, ``-o name=value`` and ``$name`` expansion.

``parse_main_cf`` turns the file's text into raw settings, each with where it was
written (``FILE, line N``, as Postfix says it): ``name = value`` lines; a line
that starts with white space continues the previous logical line; blank lines and
lines whose first non-blank character is ``#`` are comments; a later entry
overrides an earlier one with a warning.  ``parse_override`` reads one ``-o``.

``expand`` does ``$name`` expansion in values, as Postfix's mac_parse.c and
mac_expand.c do it.  Pure functions over text: no configuration, no I/O.  The caller supplies *lookup*,
which returns a parameter's (already expanded) value, or ``None`` when the name
is not defined; an undefined name expands to the empty string.

Syntax (postconf(5), "Postfix 3.0 and later"):

- ``$name``, ``${name}``, ``$(name)``: the value of *name*; ``$$`` is one ``$``.
- ``${name?text}``, ``${name?{text}}``: *text* when *name* is non-empty, else nothing;
  ``${name:text}``, ``${name:{text}}``: *text* when *name* is empty or undefined.
- ``${name?{text1}:{text2}}`` (also ``${name?{text1}:text2}``): one or the other.
- ``${{text1} OP {text2} ? {text3} : {text4}}`` with OP one of ``==``, ``!=``,
  ``<``, ``<=``, ``>``, ``>=``: both operands are expanded, then compared as
  integers when both are all digits, else as strings; ``${{a} == {b}}`` alone is
  ``true`` or empty, so ``?`` and ``:`` work on it like on a name.

Anything else (an unbalanced ``{``, a ``$`` with no name after it, a missing
``:``, text after the last ``}``, an unknown operator, more than 100 levels of
nesting) raises ``MacroError``, which the configuration reports with file and
line: Postfix stops with "macro processing error" on the same input.

``references(text)`` lists every name *text* refers to, in both branches of every
conditional (Postfix's MAC_EXP_FLAG_SCAN), for the undefined-parameter warning.

Security notes: the text is only scanned; nothing is evaluated or run, nesting is
bounded and every loop advances, so any input ends in a result or a MacroError.

Parameters: none (this is the syntax every parameter is written in).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

from trimail.errors import ConfigurationError

MAX_NESTING = 100  # Postfix: "unreasonable macro call nesting"
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_DIGITS = frozenset("0123456789")
_SPACE = " \t\r\n"  # Postfix's CHARS_SPACE
_OPERATOR_CHARS = frozenset("<>!=?+-*/~&|%")  # read as one token, for a clear error
_OPERATORS = ("==", "!=", "<", "<=", ">=", ">")
_TRUE = "true"  # a relational expression's value: non-empty or empty

Lookup = Callable[[str], "str | None"]


class ConfigError(ConfigurationError):
    """A configuration problem; ``str()`` is the one line an operator should see."""


# ---------------------------------------------------------------------------
# main.cf: logical lines and -o overrides

@dataclasses.dataclass(frozen=True, slots=True)
class Setting:
    value: str
    where: str  # "FILE, line N" (as Postfix says it), "built-in development default" or "-o NAME"


_NAME = re.compile(r"[A-Za-z0-9_]+")


def parse_main_cf(text: str, filename: str) -> tuple[dict[str, Setting], list[str]]:
    """Parse main.cf text into raw settings plus warnings; raise ConfigError."""
    settings: dict[str, Setting] = {}
    warnings: list[str] = []
    logical: list[tuple[int, str]] = []  # (first line number, text)
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[0].isspace():
            if not logical:
                raise ConfigError(f"{filename}, line {number}: continuation line without a parameter before it")
            first, previous = logical[-1]
            logical[-1] = (first, previous + " " + stripped)
        else:
            logical.append((number, line.strip()))
    for number, entry in logical:
        name, sep, value = entry.partition("=")
        name = name.strip()
        if not sep:
            raise ConfigError(f"{filename}, line {number}: missing '=' after parameter name {name.split()[0]!r}")
        if not _NAME.fullmatch(name):
            raise ConfigError(f"{filename}, line {number}: bad parameter name {name!r}")
        if name in settings:
            warnings.append(f"{filename}, line {number}: overriding earlier entry: {name}={value.strip()}")
        settings[name] = Setting(value.strip(), f"{filename}, line {number}")
    return settings, warnings


def parse_override(item: str) -> tuple[str, Setting]:
    name, sep, value = item.partition("=")
    name = name.strip()
    if not sep or not _NAME.fullmatch(name):
        raise ConfigError(f"-o {item}: use -o name=value")
    return name, Setting(value.strip(), f"-o {name}")


# ---------------------------------------------------------------------------
# $name expansion (mac_expand.c)


class MacroError(ValueError):
    """A syntax error in a value's ``$name`` expressions; ``str()`` says what and where."""


def expand(text: str, lookup: Lookup) -> str:
    """*text* with every ``$`` expression replaced (raises MacroError)."""
    expander = _Expander(lookup, scan=False)
    expander.parse(text, 0)
    return "".join(expander.out)


def references(text: str) -> list[str]:
    """Every parameter name *text* refers to, in order, each once (raises MacroError)."""
    expander = _Expander(lambda _name: None, scan=True)
    expander.parse(text, 0)
    return list(dict.fromkeys(expander.names))


def _excerpt(text: str) -> str:
    return text if len(text) <= 40 else text[:40] + "..."


class _Expander:
    def __init__(self, lookup: Lookup, *, scan: bool):
        self.lookup = lookup
        self.scan = scan
        self.out: list[str] = []
        self.names: list[str] = []

    def parse(self, text: str, level: int) -> None:
        """mac_parse: literal text, ``$$``, and ``$name``/``${...}``/``$(...)`` references."""
        i, n = 0, len(text)
        while i < n:
            dollar = text.find("$", i)
            if dollar < 0:
                self._literal(text[i:])
                return
            self._literal(text[i:dollar])
            i = dollar + 1
            if i < n and text[i] == "$":
                self._literal("$")
                i += 1
                continue
            if i < n and text[i] in "{(":
                opening = text[i]
                closing = "}" if opening == "{" else ")"
                depth, j = 1, i + 1
                while depth:
                    if j >= n:
                        raise MacroError(f"truncated macro reference: {_excerpt(text[dollar:])!r}")
                    if text[j] == opening:
                        depth += 1
                    elif text[j] == closing:
                        depth -= 1
                    j += 1
                body, i = text[i + 1:j - 1], j
            else:
                j = i
                while j < n and text[j] in _NAME_CHARS:
                    j += 1
                body, i = text[i:j], j
            if not body:
                raise MacroError(f"empty macro name: {_excerpt(text[dollar:])!r} (write $$ for a literal $)")
            self._expression(body, level + 1)

    def _literal(self, text: str) -> None:
        if text and not self.scan:
            self.out.append(text)

    def _expand_operand(self, text: str, level: int) -> str:
        inner = _Expander(self.lookup, scan=self.scan)
        inner.parse(text, level)
        self.names += inner.names
        return "".join(inner.out)

    def _expression(self, body: str, level: int) -> None:
        """mac_expand_callback: what is between ``${`` and ``}``."""
        if level > MAX_NESTING:
            raise MacroError(f"unreasonable macro call nesting: {_excerpt(body)!r}")
        n = len(body)
        start = _skip_space(body, 0)
        if start < n and body[start] == "{":
            value, cp = self._relational(body, start, level)
            mode = body[cp] if cp < n else ""
            if mode and mode not in "?:":
                raise MacroError(f"'?' or ':' expected at: {_excerpt(body[cp:])!r}")
            cp += 1
        else:
            cp = start
            while True:
                after = _skip_space(body, cp)
                if after >= n:
                    mode = ""
                    break
                if body[after] in "?:":
                    mode = body[after]
                    break
                if body[after] == "{":
                    raise MacroError(f"unknown function {body[start:cp]!r} at: {_excerpt(body)!r}")
                if body[cp] not in _NAME_CHARS:
                    raise MacroError(f"attribute name syntax error at: {_excerpt(body[cp:])!r}")
                cp += 1
            name = body[start:cp]
            if not name and mode:  # ``${?text}``: expanding skipped the text, scanning failed on it
                raise MacroError(f"empty macro name before {mode!r} at: {_excerpt(body)!r}")
            cp = after + 1
            if self.scan:
                if name:
                    self.names.append(name)
                value = None
            else:
                value = self.lookup(name) if name else None
        if mode == "":
            if value and not self.scan:
                self.out.append(value)
            return
        if mode == "?":
            text, cp = _operand(body, cp)
            if value or self.scan:
                self.parse(text, level)
            if cp >= n:
                return
            if body[cp] != ":":
                raise MacroError(f"':' expected at: {_excerpt(body[cp:])!r}")
            cp += 1
        text, cp = _operand(body, cp)
        if not value or self.scan:
            self.parse(text, level)
        if cp < n:
            raise MacroError(f"unexpected input at: {_excerpt(body[cp:])!r}")

    def _relational(self, body: str, cp: int, level: int) -> tuple[str | None, int]:
        """``{left} OP {right}``: the expression's value ("true" or "") and where it ends."""
        left, cp = _curly(body, cp)
        end = cp
        while end < len(body) and body[end] in _OPERATOR_CHARS:
            end += 1
        operator = body[cp:end]
        if operator not in _OPERATORS:
            raise MacroError(f"operator ==, !=, <, <=, >= or > expected at: {_excerpt(body[cp:])!r}")
        cp = _skip_space(body, end)
        if cp >= len(body) or body[cp] != "{":
            raise MacroError(f"'{{expression}}' expected after {operator!r} at: {_excerpt(body[cp:])!r}")
        right, cp = _curly(body, cp)
        left_value = self._expand_operand(left, level)
        right_value = self._expand_operand(right, level)
        if self.scan:
            return None, cp
        return (_TRUE if _compare(left_value, operator, right_value) else ""), cp


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i] in _SPACE:
        i += 1
    return i


def _curly(body: str, cp: int) -> tuple[str, int]:
    """The payload of the balanced ``{...}`` at *cp*, and the position after it and
    any white space (mac_exp_extract_curly_payload)."""
    depth, j = 1, cp + 1
    while True:
        if j >= len(body):
            raise MacroError(f"unbalanced {{}} in attribute expression: {_excerpt(body[cp:])!r}")
        if body[j] == "{":
            depth += 1
        elif body[j] == "}":
            depth -= 1
            if depth == 0:
                return body[cp + 1:j], _skip_space(body, j + 1)
        j += 1


def _operand(body: str, cp: int) -> tuple[str, int]:
    """A result operand after ``?`` or ``:``: ``{text}`` (white space around it
    ignored), or the rest of the expression as it is."""
    brace = _skip_space(body, cp)
    if brace < len(body) and body[brace] == "{":
        return _curly(body, brace)
    return body[cp:], len(body)


_LONG_MAX = 2**63 - 1  # Postfix compares as C longs


def _number(digits: str) -> int:
    significant = digits.lstrip("0")
    if len(significant) > len(str(_LONG_MAX)) or int(significant or "0") > _LONG_MAX:
        raise MacroError(f"number out of range in comparison: {_excerpt(digits)!r}")
    return int(significant or "0")


def _compare(left: str, operator: str, right: str) -> bool:
    if left and right and set(left) <= _DIGITS and set(right) <= _DIGITS:
        delta = _number(left) - _number(right)
    else:
        delta = (left > right) - (left < right)
    return {"==": delta == 0, "!=": delta != 0, "<": delta < 0, "<=": delta <= 0,
            ">=": delta >= 0, ">": delta > 0}[operator]
