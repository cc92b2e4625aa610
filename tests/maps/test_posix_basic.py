"""regexp: rules with the ``x`` flag are POSIX basic regular expressions (the flag
toggles REG_EXTENDED off), read as glibc's regcomp reads them (trimail.maps.posixbasic).
Each case's answer is Postfix 3.7's (``postmap -q KEY regexp:FILE``); the oracle tests
ask the installed Postfix again, and compare random rules and keys with it."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import time

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from trimail.maps import TableError, open_table

CASES = [  # (rule, key, Postfix's answer; None: not found)
    (r"/^a\(b\)\{2\}$/x hit", "abb", "hit"),  # \( \) group, \{ \} bound
    (r"/^a\(b\)\{2\}$/x hit", "a(b){2}", None),
    (r"/^a(b){2}$/x hit", "a(b){2}", "hit"),  # ( ) { } are themselves
    (r"/^a+b?$/x hit", "a+b?", "hit"),
    (r"/^a\+b\?$/x hit", "aaa", "hit"),  # GNU \+ \?
    (r"/^a|b$/x hit", "a|b", "hit"),
    (r"/^a\|b$/x hit", "b", "hit"),  # GNU \|
    (r"/^*a$/x hit", "*a", "hit"),  # * where an expression is expected is itself
    (r"/^\(*a\)$/x hit", "*a", "hit"),
    (r"/^a\|*b$/x hit", "*b", "hit"),
    (r"/^\+a$/x hit", "+a", "hit"),
    (r"/^a\b*$/x hit", "a*", "hit"),  # after any anchor
    (r"/\`*a/x hit", "*a", "hit"),
    (r"/^a*\+$/x hit", "aa", "hit"),  # \+ of a*
    (r"/^a\{2\}\+$/x hit", "aaaa", "hit"),
    (r"/^a\?\?$/x hit", "", "hit"),
    (r"/^a^b$/x hit", "a^b", "hit"),  # ^ only at the start, after \( or \|
    (r"/^^a$/x hit", "^a", "hit"),
    (r"/\`^a/x hit", "^a", "hit"),
    (r"/b\(^a\)/x hit", "b^a", None),
    (r"/b\|^a/x hit", "ca", None),
    (r"/^a$b$/x hit", "a$b", "hit"),  # $ only at the end, before \) or \|
    (r"/^a$$/x hit", "a$", "hit"),
    (r"/^$*$/x hit", "", "hit"),
    (r"/^\(a\|b$\)c/x hit", "b$c", None),
    (r"/^a$\|b/x hit", "a", "hit"),
    (r"/^a\}$/x hit", "a}", "hit"),
    (r"/^a\{,2\}$/x hit", "", "hit"),
    (r"/^a\{,\}$/x hit", "aa", "hit"),
    (r"/^\(a\)\1$/x hit", "aa", "hit"),
    (r"/^\(\(a\)\|b\)\2$/x hit", "aa", "hit"),
    (r"/^\(a\)\{2\}\1$/x [$1]", "aaa", "[a]"),
    (r"/^a\(b\|c\)*d$/x [$1]", "abcbd", "[b]"),
    (r"/^a\w\W\s\S$/x hit", "ab- x", "hit"),
    (r"/^[\(]$/x hit", "\\", "hit"),  # brackets as in an ERE
    (r"/^\d$/x hit", "d", None),  # as in an ERE, under REG_ICASE \d matches nothing
    (r"/^\d$/xi hit", "d", "hit"),
    (r"/^A\.B$/x hit", "a.b", "hit"),
    (r"/^a{2}$/xx hit", "aa", "hit"),  # x toggles: xx is an ERE again
    (r"/^a$/xix hit", "A", None),
]

# rules Postfix refuses (a warning; it skips the rule): trimail refuses the table
REFUSED = [r"/^a**$/x x", r"/^a*\{2\}$/x x", r"/^a\{2\}*$/x x", r"/^a\+*$/x x", r"/\{2\}a/x x", r"/^\{2\}/x x",
           r"/\(\{2\}\)/x x", r"/a\)/x x", r"/\(a/x x", r"/^a\{1,2}$/x x", r"/^a\{\}$/x x", r"/^a\{2,1\}$/x x",
           r"/^a\{1,x\}$/x x", r"/^\(a\1\)$/x x", r"/^\(a\)\2$/x x", r"/^a\{32768\}$/x x", r"/a\{1,2\}\{2\}/x x",
           r"/^[a/x x", r"/\(a\)\|\1/x x"]


@pytest.mark.parametrize("rule,key,answer", CASES)
def test_basic_rules_match_as_postfix(tmp_path, rule, key, answer):
    (tmp_path / "t").write_text(rule + "\n")
    assert open_table(f"regexp:{tmp_path / 't'}").lookup(key) == answer


@pytest.mark.parametrize("rule", REFUSED)
def test_basic_rules_postfix_refuses_are_table_errors(tmp_path, rule):
    (tmp_path / "t").write_text(rule + "\n")
    with pytest.raises(TableError):
        open_table(f"regexp:{tmp_path / 't'}").lookup("a")


_TABLES = itertools.count()


def _postmap(config, rule: str, keys: list[str]) -> tuple[bool, dict[str, str], str]:
    """Postfix's answer for *rule*: whether it refused the rule, what it found for each
    key; and the table, ``regexp:`` *file*."""
    table = config / f"t{next(_TABLES)}"
    table.write_text(rule + "\n")
    done = subprocess.run(["postmap", "-c", str(config), "-q", "-", f"regexp:{table}"],
                          input="".join(k + "\n" for k in keys), capture_output=True, text=True, timeout=60)
    return "warning" in done.stderr, dict(line.split("\t", 1) for line in done.stdout.splitlines()), f"regexp:{table}"


needs_postmap = pytest.mark.skipif(not shutil.which("postmap"), reason="Postfix's postmap is not installed")


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    """A config directory for postmap -c whose main.cf is an hour old: Postfix waits
    (up to 2 s, each run) for a main.cf modified this very second to settle."""
    directory = tmp_path_factory.mktemp("postfix")
    (directory / "main.cf").touch()
    past = time.time() - 3600
    os.utime(directory / "main.cf", (past, past))
    return directory


@needs_postmap
def test_postfix_itself_agrees(config):
    """The oracle: Postfix's own postmap answers each case as the tables above say."""
    from concurrent.futures import ThreadPoolExecutor

    def ask(case: tuple[str, str, str | None]) -> str | None:
        rule, key, _ = case
        return _postmap(config, rule, [key])[1].get(key)

    def refused(rule: str) -> bool:
        return _postmap(config, rule, ["a"])[0]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, CASES))
        refusals = list(pool.map(refused, REFUSED))
    assert [(rule, key, a) for (rule, key, _), a in zip(CASES, answers)] == CASES
    assert [rule for rule, r in zip(REFUSED, refusals) if not r] == []


TOKENS = ["a", "b", "A", ".", "*", "\\(", "\\)", "\\{1,2\\}", "\\{2\\}", "\\{,1\\}", "\\{1,\\}", "\\{", "\\+", "\\?",
          "\\|", "^", "$", "(", ")", "{", "}", "+", "?", "|", "[ab]", "[^a]", "[*^]", "\\1", "\\2", "\\<", "\\>",
          "\\b", "\\B", "\\w", "\\W", "\\s", "\\.", "\\*", "\\^", "\\$", "\\}", "\\`", "\\'", " "]
KEY_CHARS = "aAb*^$(){}+?|. "


@needs_postmap
@settings(max_examples=300, deadline=None)
@given(tokens=st.lists(st.sampled_from(TOKENS), min_size=1, max_size=10), flags=st.sampled_from(["x", "xi", "xm"]),
       keys=st.lists(st.text(KEY_CHARS, min_size=1, max_size=6), min_size=1, max_size=30))
@example(tokens=["^", "*", "a", "\\|", "\\(", "^", "*", "b", "\\)", "$"], flags="x", keys=["*a", "*b", "a", "x*b"])
def test_random_basic_rules_match_as_postfix(config, tokens, flags, keys):
    """Random BREs (the constructs above, mixed) and keys made of their characters:
    trimail refuses the rules Postfix refuses, and finds the keys Postfix finds."""
    pattern = "".join(tokens)
    keys = sorted(set(keys) | {pattern.replace("\\", "")})
    refused, found, name = _postmap(config, f"/{pattern}/{flags} hit", keys)
    try:
        table = open_table(name)
        mine = (False, {key for key in keys if table.lookup(key) == "hit"})
    except TableError:
        mine = (True, set())
    assert mine == (refused, set() if refused else set(found))
