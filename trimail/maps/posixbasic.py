"""POSIX basic regular expressions (regexp_table(5)'s ``x`` flag) rewritten as extended ones.

The ``x`` flag toggles REG_EXTENDED off: glibc's regcomp then reads the rule with
RE_SYNTAX_POSIX_BASIC and its GNU extensions.  ``extended`` rewrites such a rule, byte
by byte (latin-1 text, as ``trimail.maps.posix.translate`` takes it), into the ERE with
the same meaning, for ``translate`` to finish.  What glibc does (checked against
Postfix 3.7's ``postmap -q``, tests/maps/test_posix_basic.py):

- ``\\(`` ``\\)`` group, ``\\{m,n\\}`` is a bound, ``\\|`` alternation, ``\\+`` and
  ``\\?`` repeat; a plain ``( ) { } + ? |`` is itself, and so is ``\\}``;
- where an expression is expected (at the start, after ``\\(``, ``\\|`` or any anchor:
  ``^`` ``\\<`` ``\\>`` ``\\b`` ``\\B`` ``\\``` ``\\'``) ``*``, ``\\+`` and ``\\?`` are
  literal characters and ``\\{`` is an error;
- ``*`` or ``\\{`` right after a repetition is an error (``a**``, ``a*\\{2\\}``), ``\\+``
  and ``\\?`` there repeat the repeated atom (``a*\\+``);
- ``^`` is an anchor only at the start or after ``\\(`` or ``\\|`` (``^^`` is an
  anchor and a ``^``), ``$`` only at the end or before ``\\)`` or ``\\|``: elsewhere
  each is itself;
- an unmatched ``\\)`` is an error (in an ERE an unmatched ``)`` is literal);
- bracket expressions, back-references and the other escapes are the ERE's.
"""

from __future__ import annotations

import re

from trimail.maps.posix import PosixError, _bracket

_INTERVAL = re.compile(r"\\\{([^\\]*)\\\}")
_ANCHOR_ESCAPES = "<>bB`'"
_BADRPT = "Invalid preceding regular expression"


def extended(src: str) -> str:
    """The ERE (for ``translate``) that means what the BRE *src* means to glibc."""
    out: list[str] = []
    expecting = caret = True  # an expression is expected here; a ^ here is an anchor
    repeated = False  # the last token was a repetition
    depth = 0
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        i += 1
        was_expecting, was_caret, was_repeated = expecting, caret, repeated
        expecting = caret = repeated = False
        if c == "\\":
            if i >= n:
                raise PosixError("Trailing backslash")
            d = src[i]
            i += 1
            if d == "(":
                depth += 1
                out.append("(")
                expecting = caret = True
            elif d == ")":
                if not depth:
                    raise PosixError("Unmatched ( or \\(")
                depth -= 1
                out.append(")")
            elif d == "|":
                out.append("|")
                expecting = caret = True
            elif d in "+?":
                out.append("\\" + d if was_expecting else d)
                repeated = not was_expecting
            elif d == "{":
                if was_expecting or was_repeated:
                    raise PosixError(_BADRPT)
                m = _INTERVAL.match(src, i - 2)
                if not m:
                    raise PosixError("Unmatched \\{")
                if not re.fullmatch(r"\d*(,\d*)?", m.group(1)):
                    raise PosixError("Invalid content of \\{\\}")
                out.append("{" + m.group(1) + "}")
                i = m.end()
                repeated = True
            else:  # \} is a }, \1 a back-reference, \w a word character, \. a dot...
                out.append("\\" + d)
                expecting = d in _ANCHOR_ESCAPES
        elif c == "[":
            end = _bracket(src, i, False)[1]
            out.append(src[i - 1:end])
            i = end
        elif c == "*":
            if was_repeated and not was_expecting:
                raise PosixError(_BADRPT)
            out.append("\\*" if was_expecting else "*")
            repeated = not was_expecting
        elif c == "^":
            out.append("^" if was_caret else "\\^")
            expecting = was_caret
        elif c == "$":
            anchor = i == n or src.startswith(("\\)", "\\|"), i)
            out.append("$" if anchor else "\\$")
        elif c in "(){}+?|":
            out.append("\\" + c)
        else:
            out.append(c)
    if depth:
        raise PosixError("Unmatched ( or \\(")
    return "".join(out)
