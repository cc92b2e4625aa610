"""Pattern tables: cidr_table(5) and regexp_table(5) rules, parsed and matched.

Pure functions over a source file's text: ``parse_cidr``/``parse_regexp`` turn
it into rules (raising ``TableError`` with file and line), ``match_cidr`` and
``match_regexp`` find the first rule that applies.  The table classes that
reload them live in ``trimail.maps``.

Security notes: regular expressions come from the operator's file, not from
clients; a client's text is only ever the subject of ``search``.  Yet an operator's
rule can backtrack catastrophically (``/^Subject: (a|aa)+$/``) on a text the client
chooses, and Python's ``re`` holds the interpreter for a whole match: one message froze
every session of its process (red team 36b).  Postfix is safe there (glibc's regexec,
PCRE's match limit).  So the rules are compiled with the ``regex`` module (``re``'s
syntax, VERSION0; a ``regexp:`` rule is POSIX ERE, translated by ``trimail.maps.posix``
and matched on the key's UTF-8 bytes), which avoids much of that backtracking and bounds each match:
one that takes longer than ``MATCH_TIMEOUT`` is a lookup error (``TableError``: a
temporary failure, ``451 4.3.0`` in SMTP), logged with the rule's pattern.  A match
on a long key (a header, past ``CONCURRENT_FROM`` characters) lets other threads run
meanwhile (the scans of header_checks run on threads); a short key's does not, so
a lookup on the event loop never waits to get the interpreter back.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import regex

from trimail.maps.posix import translate
from trimail.maps.posixbasic import extended
from trimail.maps.source import TableError, logical_lines

MATCH_TIMEOUT = 0.1  # seconds one rule's match may take (see the module docstring)
CONCURRENT_FROM = 4096  # key length from which a match releases the interpreter

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
CidrRules = list[tuple[Network, str]]
RegexpRules = list[tuple[list[tuple[regex.Pattern, bool]], str]]
# $$, $n, ${n}, $(n) (Postfix's mac_parse: a name is letters, digits and _)
_REFERENCE = re.compile(r"\$(?:\$|([A-Za-z0-9_]+)|\{([A-Za-z0-9_]*)\}|\(([A-Za-z0-9_]*)\)|)")


def parse_cidr(path: Path) -> CidrRules:
    """``network/prefix result`` lines, in file order."""
    rules: CidrRules = []
    for number, line in logical_lines(path):
        spec, _, result = line.replace("\t", " ").partition(" ")  # "network<TAB>result" too
        if spec.startswith("!"):
            raise TableError(f"{path}:{number}: negated cidr patterns are not supported")
        try:
            network = ipaddress.ip_network(spec.strip("[]") if "/" not in spec else
                                           spec.replace("[", "").replace("]", ""), strict=False)
        except ValueError:
            raise TableError(f"{path}:{number}: bad network {spec!r}") from None
        if not result.strip():
            raise TableError(f"{path}:{number}: no result for {spec}")
        rules.append((network, result.strip()))
    return rules


def match_cidr(rules: CidrRules, key: str) -> str | None:
    try:
        address = ipaddress.ip_address(key.strip("[]"))
    except ValueError:
        return None
    for network, result in rules:
        if address.version == network.version and address in network:
            return result
    return None


def parse_regexp(path: Path, pcre: bool = False) -> RegexpRules:
    """``/pattern/flags result``, ``!/pattern/``, ``if /pattern/`` ... ``endif``; with
    *pcre*, pcre_table(5)'s flags and defaults (see ``_parse_pattern``)."""
    rules: RegexpRules = []
    conditions: list[tuple[regex.Pattern, bool]] = []
    stack: list[int] = []
    for number, line in logical_lines(path):
        if line.lower() == "endif":
            if not stack:
                raise TableError(f"{path}:{number}: endif without if")
            del conditions[stack.pop():]
            continue
        is_if = line.lower().startswith("if ") or line.lower().startswith("if\t")
        body = line[3:].strip() if is_if else line
        pattern, negated, rest = _parse_pattern(path, number, body, pcre)
        if is_if:
            stack.append(len(conditions))
            conditions.append((pattern, negated))
            continue
        if not rest:
            raise TableError(f"{path}:{number}: no result after the pattern")
        rules.append(([*conditions, (pattern, negated)], rest))
    if stack:
        raise TableError(f"{path}: if without endif")
    return rules


def match_regexp(rules: RegexpRules, key: str) -> str | None:
    """The first matching rule's result with ``$n`` replaced (no case folding of the
    key: the pattern flags decide)."""
    concurrent = len(key) >= CONCURRENT_FROM
    raw = key.encode("utf-8", "surrogateescape")  # what regexp: (POSIX, C locale) patterns see
    for conditions, result in rules:
        matches = []
        ok = True
        for pattern, negated in conditions:
            try:
                m = pattern.search(raw if isinstance(pattern.pattern, bytes) else key,
                                   concurrent=concurrent, timeout=MATCH_TIMEOUT)
            except TimeoutError:
                raise TableError(f"regexp: /{_text(pattern.pattern)[:80]}/ took longer than {MATCH_TIMEOUT:g} s to match"
                                 f" a key of {len(key)} characters: a rule that backtracks") from None
            if bool(m) == negated:
                ok = False
                break
            matches.append(m)
        if ok:
            last = matches[-1] if matches else None
            return _REFERENCE.sub(lambda g: _expand(last, g), result)
    return None


def _text(value: str | bytes | None) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else (value or "")


def _expand(match, reference: re.Match) -> str:
    """One reference of a result checked by ``_check_result``: ``$$`` is a ``$``."""
    name = next((g for g in reference.groups() if g is not None), None)
    if name is None:
        return "$"
    return _text(match.group(int(name))) if match is not None else ""


def _check_result(result: str, groups: int, negated: bool) -> str | None:
    """What Postfix's regexp/pcre tables refuse in a result (they skip the rule):
    a ``$`` that is not ``$$`` or a reference, a name that is not a number, a number
    outside 1..groups, any number in a negated rule's result."""
    for g in _REFERENCE.finditer(result):
        if g.group(0) == "$$":
            continue
        name = next((x for x in g.groups() if x is not None), None)
        if not name:
            return f"bad replacement syntax in {result!r}"
        if not name.isdigit():
            return f"non-numeric replacement index {name!r}"
        if negated:
            return "$number found in negative match replacement text"
        if not 1 <= int(name) <= groups:
            return f"out of range replacement index {name!r}"
    return None


def _parse_pattern(path: Path, number: int, text: str, pcre: bool = False) -> tuple[regex.Pattern, bool, str]:
    """One ``/pattern/flags`` and what follows it.  regexp_table(5) is POSIX regcomp with
    REG_EXTENDED | REG_ICASE: ``.`` matches a newline too (a folded header in
    header_checks is one string with its newlines) unless the ``m`` flag
    (REG_NEWLINE), which also makes ``^`` and ``$`` match at each line; ``x`` toggles
    REG_EXTENDED off (a basic RE, ``trimail.maps.posixbasic``).
    pcre_table(5): ``.`` does not match a newline unless the ``s`` flag (PCRE_DOTALL);
    ``m`` is PCRE_MULTILINE.  ``i`` turns case sensitivity on in both.  Each flag
    toggles, as in Postfix: ``ii`` is case insensitive again."""
    negated = text.startswith("!")
    if negated:
        text = text[1:]
    if not text or text[0].isspace():
        raise TableError(f"{path}:{number}: expected /pattern/flags")
    delimiter = text[0]  # Postfix: any character delimits the pattern (/ is usual)
    end = 1
    while end < len(text):
        if text[end] == "\\":
            end += 2
            continue
        if text[end] == delimiter:
            break
        end += 1
    if end >= len(text):
        raise TableError(f"{path}:{number}: unterminated pattern")
    pattern, rest = text[1:end], text[end + 1:]
    flags_text, result = (re.split(r"[ \t]+", rest, maxsplit=1) + [""])[:2]
    if not pcre and not re.fullmatch(r"[imx]*", flags_text):  # Postfix skips such a rule
        raise TableError(f"{path}:{number}: unknown regexp option in {flags_text!r}")
    if not re.fullmatch(r"[imsx]*", flags_text):
        result, flags_text = rest, ""
    flags = regex.IGNORECASE if pcre else regex.IGNORECASE | regex.DOTALL
    if flags_text.count("i") % 2:
        flags &= ~regex.IGNORECASE  # Postfix: the i flag toggles case sensitivity on
    if flags_text.count("m") % 2:
        flags = (flags | regex.MULTILINE) if pcre else (flags | regex.MULTILINE) & ~regex.DOTALL
    if flags_text.count("s") % 2:
        flags |= regex.DOTALL
    basic = not pcre and flags_text.count("x") % 2 == 1  # regexp: x toggles REG_EXTENDED off
    if pcre and flags_text.count("x") % 2:
        flags |= regex.VERBOSE
    source: str | bytes = pattern
    try:
        if not pcre:  # POSIX ERE (trimail.maps.posix) or BRE (.posixbasic), on the key's bytes
            posix = pattern.encode("utf-8", "surrogateescape").decode("latin-1")
            source = translate(extended(posix) if basic else posix,
                               icase=bool(flags & regex.IGNORECASE),
                               newline=bool(flags & regex.MULTILINE)).encode("latin-1")
        compiled = regex.compile(source, flags | regex.VERSION0)
    except (regex.error, ValueError) as exc:  # PosixError is a ValueError
        raise TableError(f"{path}:{number}: bad regular expression: {exc}") from None
    result = result.strip()
    problem = _check_result(result, compiled.groups, negated)
    if problem:
        raise TableError(f"{path}:{number}: {problem}")
    return compiled, negated, result
