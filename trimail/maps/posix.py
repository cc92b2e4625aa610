"""POSIX extended regular expressions (regexp_table(5)) in the ``regex`` module's syntax.

Postfix compiles a ``regexp:`` rule with glibc's ``regcomp(REG_EXTENDED | REG_ICASE)``
in the C locale; Python's syntax reads many of the same texts differently, silently.
``translate`` rewrites one POSIX ERE, byte by byte (the text is given as a latin-1
string of the pattern's UTF-8 bytes: in the C locale glibc matches bytes, ``.`` is one
byte of an ``é`` and case folding is ASCII), into a pattern for ``regex.compile`` of
bytes with VERSION0.  What glibc does, and so what the translation does:

- a bracket expression is POSIX: a backslash in it is a literal backslash, a ``]``
  first in it (``[]a]``, ``[^]a]``) is a member, ``[:class:]`` (only the twelve
  POSIX classes), ``[=c=]`` and ``[.c.]`` (one character) are recognised, a ``-``
  that is neither first, last nor a range's end is an error; with the ``m`` flag
  (REG_NEWLINE) a non-matching list never matches a newline;
- GNU escapes: ``\\<`` ``\\>`` ``\\b`` ``\\B`` ``\\w`` ``\\W`` ``\\s`` ``\\S`` and
  ``\\``` (start of the text) ``\\'`` (end); ``\\1``-``\\9`` refer to a closed group,
  not one in an earlier branch of the same alternation (``(a)|\\1`` is an error);
  any other escaped character is itself (``\\d`` is a ``d``, ``\\t`` a ``t``) -
  and under REG_ICASE glibc compares an escaped lowercase letter unfolded against
  the folded (upper-case) text, so ``\\d`` there matches nothing at all;
- ``$`` is the end of the text (Python's ``$`` also matches before a final newline),
  with ``m`` the end of each line;
- a quantifier after a quantifier applies to the quantified atom (``a+?`` is
  ``(a+)?``, not a lazy ``+``; ``a**``); one with nothing to repeat (at the start,
  after ``(``, ``|``, ``^`` or ``$``) is an error, as is a ``{`` that is not a
  bound (``{m}``, ``{m,}``, ``{m,n}``, ``{,n}``, ``{,}``, at most RE_DUP_MAX);
- ``(?`` and other Python extensions are errors (``?`` has nothing to repeat);
  an unmatched ``)`` is a literal.

A rule with the ``x`` flag (REG_EXTENDED off) is a basic RE: ``trimail.maps.posixbasic``
rewrites it as the ERE that means the same, and ``translate`` takes that.

Not translated: POSIX's leftmost-longest rule (see docs/postfix.md).
"""

from __future__ import annotations

import re

RE_DUP_MAX = 0x7FFF
NOTHING = r"[^\x00-\xff]"  # an atom that matches no byte

CLASSES = {
    "alpha": "A-Za-z", "upper": "A-Z", "lower": "a-z", "digit": "0-9", "alnum": "0-9A-Za-z",
    "xdigit": "0-9A-Fa-f", "space": r"\x09-\x0d\x20", "blank": r"\x09\x20", "punct": r"\x21-\x2f\x3a-\x40\x5b-\x60\x7b-\x7e",
    "print": r"\x20-\x7e", "graph": r"\x21-\x7e", "cntrl": r"\x00-\x1f\x7f",
}
ANCHORS = {"<": r"\b(?=\w)", ">": r"\b(?<=\w)", "b": r"\b", "B": r"\B", "`": r"\A", "'": r"\Z"}
CLASS_ESCAPES = {"w": r"\w", "W": r"\W", "s": r"\s", "S": r"\S"}
_BOUND = re.compile(r"\{(\d*)(,(\d*))?\}")


class PosixError(ValueError):
    """A pattern glibc's regcomp refuses (Postfix skips the rule with a warning)."""


def _lit(c: str) -> str:
    return c if c.isascii() and c.isalnum() else f"\\x{ord(c):02x}"


def translate(src: str, icase: bool = True, newline: bool = False) -> str:
    """*src*: the pattern's bytes as latin-1 text; the result likewise (encode it latin-1)."""
    out: list[str] = []
    last: int | None = None  # out index where the last quantifiable piece starts
    quantified = False
    opened: list[tuple[int, int]] = []  # (out index of "(", group number)
    closed: set[int] = set()  # the groups a back-reference here may name
    # per open (: the groups closed at its start, and in its earlier branches
    levels: list[tuple[set[int], set[int]]] = [(set(), set())]
    groups = 0
    i, n = 0, len(src)

    def atom(text: str) -> None:
        nonlocal last, quantified
        last, quantified = len(out), False
        out.append(text)

    def quantify(text: str) -> None:
        nonlocal quantified
        if last is None:
            raise PosixError("Invalid preceding regular expression")
        if quantified:  # POSIX a+? and a** apply to the quantified atom
            out[last:] = ["(?:" + "".join(out[last:]) + ")"]
        out.append(text)
        quantified = True

    while i < n:
        c = src[i]
        i += 1
        if c == "\\":
            if i >= n:
                raise PosixError("Trailing backslash")
            d = src[i]
            i += 1
            if d in "123456789":
                if int(d) not in closed:
                    raise PosixError("Invalid back reference")
                atom(f"(?:\\{d})")
            elif d in ANCHORS:
                out.append(ANCHORS[d])
                last = None
            elif d in CLASS_ESCAPES:
                atom(CLASS_ESCAPES[d])
            elif icase and "a" <= d <= "z":
                atom(NOTHING)  # glibc: never equal to the upper-cased text
            else:
                atom(_lit(d))
        elif c == "[":
            text, i = _bracket(src, i, newline)
            atom(text)
        elif c == "(":
            groups += 1
            opened.append((len(out), groups))
            levels.append((set(closed), set()))
            out.append("(")
            last = None
        elif c == ")":
            if not opened:
                atom(r"\)")
                continue
            start, number = opened.pop()
            out.append(")")
            closed |= levels.pop()[1] | {number}
            last, quantified = start, False
        elif c == "|":  # glibc: a branch's back-references name no group of an earlier branch
            levels[-1][1].update(closed)
            closed = set(levels[-1][0])
            out.append("|")
            last = None
        elif c == "^":
            out.append("^")
            last = None
        elif c == "$":
            out.append("$" if newline else r"\Z")
            last = None
        elif c in "*+?":
            quantify(c)
        elif c == "{":
            if last is None:
                raise PosixError("Invalid preceding regular expression")
            m = _BOUND.match(src, i - 1)
            if not m or (not m.group(1) and not m.group(2)):  # {,} is {0,}
                raise PosixError("Invalid content of \\{\\}")
            low = int(m.group(1) or 0)
            high = low if not m.group(2) else (int(m.group(3)) if m.group(3) else None)
            if (high is not None and high < low) or max(low, high or 0) > RE_DUP_MAX:
                raise PosixError("Invalid content of \\{\\}")
            quantify(f"{{{low}}}" if not m.group(2) else f"{{{low},{'' if high is None else high}}}")
            i = m.end()
        elif c == ".":
            atom(".")
        else:
            atom(_lit(c))
    if opened:
        raise PosixError("Unmatched ( or \\(")
    return "".join(out)


def _element(src: str, i: int) -> tuple[str, str, int]:
    """A bracket element at *i*: ("class"|"equiv"|"char", value, next index)."""
    n = len(src)
    if src[i] == "[" and i + 1 < n and src[i + 1] in ":.=":
        kind = src[i + 1]
        end = src.find(kind + "]", i + 2)
        if end < 0:
            raise PosixError("Unmatched [, [^, [:, [., or [=")
        name = src[i + 2:end]
        if kind == ":":
            if name not in CLASSES:
                raise PosixError("Invalid character class name")
            return "class", name, end + 2
        if len(name) != 1:
            raise PosixError("Invalid collation character")
        return ("equiv" if kind == "=" else "char"), name, end + 2
    return "char", src[i], i + 1


def _bracket(src: str, i: int, newline: bool) -> tuple[str, int]:
    """The bracket expression whose ``[`` is before *i*, as a regex set; the index after it."""
    n = len(src)
    negated = i < n and src[i] == "^"
    if negated:
        i += 1
    parts: list[str] = []
    first = True
    while True:
        if i >= n:
            raise PosixError("Unmatched [, [^, [:, [., or [=")
        if src[i] == "]" and not first:
            i += 1
            break
        if src[i] == "-" and not first and i + 1 < n and src[i + 1] != "]":
            raise PosixError("Invalid range end")
        first = False
        kind, value, i = _element(src, i)
        if kind == "class":
            parts.append(CLASSES[value])
            continue
        if kind == "char" and i + 1 < n and src[i] == "-" and src[i + 1] != "]":
            end_kind, end, i = _element(src, i + 1)
            if end_kind != "char" or ord(end) < ord(value):
                raise PosixError("Invalid range end")
            parts.append(f"{_lit(value)}-{_lit(end)}")
        else:
            parts.append(_lit(value))
    if negated and newline:
        parts.append(r"\x0a")
    return "[" + ("^" if negated else "") + "".join(parts) + "]", i
