"""Lookup tables: inline, static, texthash, hash compiled by postmap."""

from __future__ import annotations

import os

import pytest

from tests.conftest import trimail
from trimail.maps import TableError, compiled_path, open_table, postmap


def test_inline_table_with_braced_values():
    table = open_table("inline:{ a.example=smtp:[h]:25, { b.example = error:5.1.1 no such domain }, C=x }")
    assert table.lookup("A.EXAMPLE") == "smtp:[h]:25"
    assert table.lookup("b.example") == "error:5.1.1 no such domain"
    assert table.lookup("c") == "x"
    assert table.lookup("d") is None


def test_static_table():
    assert open_table("static:{relay:[gw]}").lookup("anything") == "relay:[gw]"


def test_texthash_reads_source_and_notices_changes(tmp_path, monkeypatch):
    monkeypatch.setattr("trimail.maps.RECHECK_SECONDS", 0)
    source = tmp_path / "transport"
    source.write_text("# comment\nExample.COM  smtp:[mx]:2525\nlong.example relay:\n  [gw]:25\n")
    table = open_table(f"texthash:{source}")
    assert table.lookup("example.com") == "smtp:[mx]:2525"
    assert table.lookup("long.example") == "relay:  [gw]:25"  # a continuation line is joined verbatim (postmap)
    source.write_text("example.com discard:\n")
    os.utime(source, ns=(1, 10**18))
    assert table.lookup("example.com") == "discard:"


def test_postmap_compiles_atomically_and_hash_reloads(tmp_path, monkeypatch):
    monkeypatch.setattr("trimail.maps.RECHECK_SECONDS", 0)
    source = tmp_path / "access"
    source.write_text("a.example OK\nA.example REJECT duplicate\nb.example 550 go away\n")
    count, warnings = postmap(source)
    assert count == 2 and "duplicate entry" in warnings[0]
    table = open_table(f"hash:{source}")
    assert table.lookup("A.EXAMPLE") == "OK"
    assert table.lookup("b.example") == "550 go away"
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []
    source.write_text("a.example DUNNO\n")
    postmap(source)
    os.utime(compiled_path(source), ns=(1, 10**18))
    assert table.lookup("a.example") == "DUNNO"
    assert table.lookup("b.example") is None


def test_hash_without_database_names_the_fix(tmp_path):
    source = tmp_path / "transport"
    source.write_text("a b\n")
    with pytest.raises(TableError, match="cannot open"):
        open_table(f"hash:{source}")


def test_bad_source_line_names_file_and_line(tmp_path):
    source = tmp_path / "t"
    source.write_text("good value\nlonely\n")
    with pytest.raises(TableError, match=r"t:2: expected format: key whitespace value"):
        postmap(source)


def test_postmap_command_compiles_and_queries(tmp_path):
    source = tmp_path / "transport"
    source.write_text("example.com smtp:[127.0.0.1]:2525\n")
    assert trimail("postmap", str(source)).returncode == 0
    assert compiled_path(source).exists()
    found = trimail("postmap", "-q", "EXAMPLE.com", f"hash:{source}")
    assert found.returncode == 0 and found.stdout == "smtp:[127.0.0.1]:2525\n"
    assert trimail("postmap", "-q", "other.example", f"hash:{source}").returncode == 1


def test_cidr_and_regexp_tables(tmp_path):
    (tmp_path / "c").write_text("192.0.2.0/24 REJECT net\n10.1.2.3 OK\n[2001:db8::]/32 DUNNO\n")
    cidr = open_table(f"cidr:{tmp_path / 'c'}")
    assert [cidr.lookup(a) for a in ("192.0.2.77", "10.1.2.3", "2001:db8::5", "8.8.8.8")] == [
        "REJECT net", "OK", "DUNNO", None]
    (tmp_path / "r").write_text("/^(.*)@spam\\.example$/ REJECT no $1\nif /example\\.com$/\n"
                                "!/^good@/ 550 bad\nendif\n/CaSe/i OK\n")
    regexp = open_table(f"regexp:{tmp_path / 'r'}")
    assert [regexp.lookup(k) for k in ("joe@spam.example", "bad@example.com", "good@example.com", "CaSe", "case",
                                       "JOE@SPAM.EXAMPLE")] == ["REJECT no joe", "550 bad", None, "OK", None,
                                                                "REJECT no JOE"]
    (tmp_path / "bad").write_text("if /x/\n/y/ OK\n")
    with pytest.raises(TableError, match="if without endif"):
        open_table(f"regexp:{tmp_path / 'bad'}")


def test_regexp_dot_matches_the_newline_of_a_folded_header_and_pcre_dot_does_not(tmp_path):
    """regexp_table(5) is POSIX regexec without REG_NEWLINE: a folded header in
    header_checks (one string, its lines joined by newlines) matches ``first.*second``
    unless the ``m`` flag; pcre_table(5) needs the ``s`` flag for that."""
    folded = "X-Folded: first\n\tsecond"
    (tmp_path / "r").write_text("/^X-Folded: first.*second/ REJECT folded\n/^\tsecond/m DUNNO\n")
    (tmp_path / "m").write_text("/^X-Folded: first.*second/m REJECT folded\n")
    (tmp_path / "p").write_text("/^X-Folded: first.*second/ REJECT folded\n/first.*second/s DUNNO\n")
    assert open_table(f"regexp:{tmp_path / 'r'}").lookup(folded) == "REJECT folded"
    assert open_table(f"regexp:{tmp_path / 'r'}").lookup("x\n\tsecond") == "DUNNO"
    assert open_table(f"regexp:{tmp_path / 'm'}").lookup(folded) is None
    assert open_table(f"pcre:{tmp_path / 'p'}").lookup(folded) == "DUNNO"


def test_a_rule_that_backtracks_is_a_bounded_lookup_error_that_holds_no_other_thread(tmp_path):
    """Python's re held the interpreter for a whole catastrophic match (red team 36b):
    one client's text froze the process.  The rules are the regex module's: a match
    is bounded (MATCH_TIMEOUT: a TableError), and one on a long key lets other threads run."""
    import threading
    import time

    from trimail.maps.patterns import MATCH_TIMEOUT

    rules = tmp_path / "checks.regexp"
    rules.write_text("/^Subject: (a|aa)+$/ REJECT slow\n/^Subject: fine/ OK\n")
    table = open_table(f"regexp:{rules}")
    assert table.lookup("Subject: fine day") == "OK"
    started = time.monotonic()
    with pytest.raises(TableError, match="took longer than"):
        table.lookup("Subject: " + "a" * 60 + "!")
    assert time.monotonic() - started < MATCH_TIMEOUT + 2
    # a long key: another thread keeps running while the match goes on
    ticks, done = [0], threading.Event()

    def look() -> None:
        try:
            table.lookup("Subject: " + "a" * 5000 + "!")
        except TableError:
            pass
        done.set()

    worker = threading.Thread(target=look)
    worker.start()
    while not done.is_set():
        ticks[0] += 1
    worker.join()
    assert ticks[0] > 50_000, ticks


def test_posix_classes_match_as_in_postfix(tmp_path):
    """regexp_table(5) is POSIX: [[:digit:]] and friends are common in Postfix rules.
    Python's re read [[:digit:]] as a set of ':digt' and then a ']' (it matched none of
    these keys); the regex module knows the classes."""
    rules = tmp_path / "clients.regexp"
    rules.write_text("/^[[:digit:]]+-[[:digit:]]+-[[:digit:]]+\\.dyn\\./ REJECT dynamic\n"
                     "/^[[:alpha:]]+[[:space:]]is[[:punct:]]$/ OK\n")
    table = open_table(f"regexp:{rules}")
    assert table.lookup("10-1-2.dyn.example.net") == "REJECT dynamic"
    assert table.lookup("mail.example.net") is None
    assert table.lookup("Sky is!") == "OK"
