"""regexp: rules are POSIX extended regular expressions as glibc's regcomp reads them
(Postfix's regexp_table(5), REG_EXTENDED | REG_ICASE, C locale).  Each case's answer
is Postfix 3.7's (``postmap -q KEY regexp:FILE``); every one differed before
trimail.maps.posix translated the rules (they were read as Python regexes)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from trimail.maps import TableError, open_table

CASES = [  # (rule, key, Postfix's answer; None: not found)
    (r"/[\d]/ hit", "\\", "hit"),  # a backslash in a bracket is literal
    (r"/[\d]/ hit", "5", None),
    (r"/^[a\]]+$/ hit", "\\]", "hit"),  # [a\] then a literal ]
    (r"/^[a\]]+$/ hit", "a", None),
    (r"/^[[=a=]]$/ hit", "A", "hit"),
    (r"/^a[[.-.]]$/ hit", "a-", "hit"),
    (r"/\<foo\>/ hit", "a foo b", "hit"),
    (r"/\>/ hit", "a b", "hit"),
    (r"/foo\'/ hit", "foo", "hit"),
    (r"/\`foo/ hit", "foo", "hit"),
    (r"/^\d$/ hit", "5", None),  # \d is a d, and under REG_ICASE glibc matches it with nothing
    (r"/^\d$/i hit", "d", "hit"),
    (r"/\d+\.\d+/ REJECT digits", "12.34.isp", None),
    (r"/^a\tb$/ hit", "a\tb", None),
    (r"/^\E$/ hit", "e", "hit"),  # an escaped character is itself
    (r"/^a\Z/ hit", "aZ", "hit"),
    (r"/^a**$/ hit", "aaa", "hit"),  # a quantifier of a quantified atom
    (r"/^a{1,2}{2}$/ hit", "aaa", "hit"),
    (r"/^a{,}$/ hit", "aa", "hit"),  # {,} is {0,}
    (r"/^(a+?)/ [$1]", "aaa", "[aaa]"),  # +? is (+)?, not lazy
    (r"/^(.*?)@/ [$1]", "a@b@c", "[a@b]"),
    (r"/^foo$/ hit", "foo\n", None),  # $ is the end of the text
    (r"/^Message-ID: *$/ REJECT empty id", "Message-ID:\n", None),
    (r"/^a[^x]b$/m hit", "a\nb", None),  # REG_NEWLINE: [^x] is not a newline
    (r"/^[é]$/ hit", "é", None),  # the C locale: bytes
    (r"/^..$/ hit", "é", "hit"),
    (r"/^é$/ hit", "É", None),  # ASCII case folding
    (r"/^[[:alpha:]]$/ hit", "é", None),
    (r"/^\W$/ hit", "\N{EM DASH}", None),
    (r"/a)/ hit", "a)", "hit"),  # an unmatched ) is literal
    (r"/(a)/ x$$w", "a", "x$w"),  # $$ is a $
    (r"/(a)/ x$$1", "a", "x$1"),
    (r"/(a)/ x$(1)y", "a", "xay"),
    (r"/(a)/ x$01", "a", "xa"),
    (r"/(a)(b)(c)(d)(e)(f)(g)(h)(i)(j)/ $10", "abcdefghij", "j"),
    (r"=a= x", "a", "x"),  # any delimiter
    (r"/^((a)|b)\2$/ hit", "aa", "hit"),  # a group of any branch, after the alternation
    (r"/^(a)(b|\1)$/ hit", "aa", "hit"),
    (r"/^a$/ii hit", "A", "hit"),  # each flag toggles: ii is case insensitive again
    (r"/^a$/mm hit", "a\nb", None),
    (r"/^a$/m hit", "a\nb", "hit"),
]

# rules Postfix refuses (a warning; it skips the rule): trimail refuses the table
REFUSED = [r"/(?i)abc/ x", r"/(?:abc)/ x", r"/^a{$/ x", r"/^a{x}$/ x", r"/^{a$/ x", r"/^*a$/ x", r"/a$*/ x",
           r"/^[[:word:]]$/ x", r"/^[[:digit]$/ x", r"/^[a-c-e]$/ x", r"/^a{99999}$/ x", r"/^\1(a)$/ x",
           r"/^[[.hyphen.]]$/ x", r"/(a)/ x$2", r"/(a)/ x$0", r"/(a)/ x$1y", r"/(a)/ x$", r"/(a)/ x${1",
           "!/(a)/ x$1", r"/a/q x", r"/(a)|\1/ x", r"/b()|b\1/ x"]  # \1 of an earlier branch


@pytest.mark.parametrize("rule,key,answer", CASES)
def test_regexp_rules_match_as_postfix(tmp_path, rule, key, answer):
    (tmp_path / "t").write_text(rule + "\n")
    assert open_table(f"regexp:{tmp_path / 't'}").lookup(key) == answer


@pytest.mark.parametrize("rule", REFUSED)
def test_rules_postfix_refuses_are_table_errors(tmp_path, rule):
    (tmp_path / "t").write_text(rule + "\n")
    with pytest.raises(TableError):
        open_table(f"regexp:{tmp_path / 't'}").lookup("a")


def test_pcre_results_expand_as_postfix(tmp_path):
    (tmp_path / "t").write_text(r"/^(.*)@(.*)\.(ru|cn)$/ REJECT $1 at $2 $$3" + "\n")
    assert open_table(f"pcre:{tmp_path / 't'}").lookup("joe@mail.ru") == "REJECT joe at mail $3"


@pytest.mark.skipif(not shutil.which("postmap"), reason="Postfix's postmap is not installed")
def test_postfix_itself_agrees(tmp_path):
    """The oracle: Postfix's own postmap answers each case as the table above says."""
    from concurrent.futures import ThreadPoolExecutor

    (tmp_path / "main.cf").write_text("")

    def ask(number: int) -> str | None:
        rule, key, _ = CASES[number]
        (tmp_path / f"t{number}").write_text(rule + "\n")
        done = subprocess.run(["postmap", "-c", str(tmp_path), "-q", key, f"regexp:{tmp_path / f't{number}'}"],
                              capture_output=True, text=True, timeout=60)
        return done.stdout.removesuffix("\n") if done.returncode == 0 else None

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(len(CASES))))
    assert [(rule, key, a) for (rule, key, _), a in zip(CASES, answers)] == CASES


def test_smtpd_forbidden_commands_reads_a_pcre_entry_as_pcre(make_config):
    """A ``pcre:`` entry of smtpd_forbidden_commands was parsed as ``regexp:``, which is
    POSIX now: ``\\d`` (a digit in PCRE) never matches there, as in Postfix."""
    from trimail.receive.protocol import forbidden_tables

    matcher = forbidden_tables(make_config(smtpd_forbidden_commands="pcre:{{/^\\d/ Bogus}}"))
    assert matcher is not None and matcher("1HELO")
    posix = forbidden_tables(make_config(smtpd_forbidden_commands="regexp:{{/^[[:digit:]]/ Bogus}}"))
    assert posix is not None and posix("1HELO") and not posix("HELO")
