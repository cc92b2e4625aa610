"""Red team 36b: the scan's input and output, pure (trimail.receive.checks._lines,
trimail.cleanup.checks.ContentChecks)."""

from __future__ import annotations

import re
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from trimail.cleanup.checks import ContentChecks
from trimail.maps import open_table
from trimail.queue.spool import Spool
from trimail.receive.checks import _lines


def _spool(tmp_path, data: bytes) -> Spool:
    spool = Spool(tmp_path, memory_limit=1 << 16)
    spool.write(data)
    return spool


@given(st.binary(max_size=3000), st.integers(min_value=1, max_value=5000))
@settings(max_examples=200, deadline=None)
def test_lines_are_the_content_split_after_each_newline(tmp_path_factory, data: bytes, pad: int) -> None:
    data = b"x" * pad + data  # in memory and in a file, lines across chunk borders
    spool = _spool(tmp_path_factory.getbasetemp(), data * 20)
    lines = list(_lines(spool))
    assert b"".join(lines) == data * 20
    assert all(line.endswith(b"\n") for line in lines[:-1]) and all(b"\n" not in line[:-1] for line in lines)
    spool.close()


def test_a_line_of_48_mb_without_newline_is_read_in_linear_time(tmp_path) -> None:
    """_lines appended each 64 KiB chunk to the line so far by copying it: a 48 MB
    line without a newline (message_size_limit raised) cost 10 s of the scan and
    twice its size at each step; now the line is gathered in one buffer."""
    spool = _spool(tmp_path, b"Subject: x\r\n\r\n" + b"x" * (48 << 20))
    started = time.monotonic()
    assert sum(len(line) for line in _lines(spool)) == spool.size
    assert time.monotonic() - started < 2
    spool.close()


LINES = st.lists(st.binary(max_size=300).map(lambda b: b.replace(b"\n", b"")) |
                 st.sampled_from([b"", b"--b", b"--b--", b"Content-Type: multipart/mixed; boundary=b",
                                  b"Content-Type: message/rfc822", b" folded", b"\tfolded", b"X: y", b"\r"]),
                 max_size=60)


@given(LINES, st.sampled_from([b"\r\n", b"\n"]), st.booleans())
@settings(max_examples=300, deadline=None)
def test_a_message_no_rule_matches_comes_out_byte_identical(lines: list[bytes], newline: bytes,
                                                           final: bool) -> None:
    never = open_table("inline:{never-matches-this-key=REJECT}")
    checks = ContentChecks([never], [never], [never], [never], body_limit=100, line_limit=50)
    data = newline.join(lines) + (newline if final and lines else b"")
    out: list[bytes] = []
    outcome = checks.scan(_split(data), out.append, lambda *note: None)
    assert b"".join(out) == data
    assert outcome.reject is None and not outcome.edited


def _split(data: bytes) -> list[bytes]:
    """Lines as _lines cuts them: after each newline (a bare CR is no end of line)."""
    return re.findall(rb"[^\n]*\n|[^\n]+\Z", data)


def test_redirect_without_user_at_domain_is_ignored_with_a_warning() -> None:
    """``REDIRECT postmaster`` (or REDIRECT with nothing after it, or a stray word) made
    the message's only recipient that text; Postfix's cleanup ignores a REDIRECT target
    without ``@`` and warns ("need user@domain"), and so does trimail now."""
    for value in ("REDIRECT postmaster", "REDIRECT", "REDIRECT not an address"):
        table = open_table(f"inline:{{{{subject: x={value}}}}}")
        checks = ContentChecks([table], [], [], [])
        notes: list[tuple] = []
        outcome = checks.scan([b"Subject: x\r\n", b"\r\n", b"body\r\n"], lambda line: None, lambda *n: notes.append(n))
        assert outcome.redirect is None, value
        assert notes and notes[0][0] == "warning" and "need user@domain" in notes[0][2], notes
    table = open_table("inline:{{subject: x=REDIRECT boss@example.com}}")
    outcome = ContentChecks([table], [], [], []).scan([b"Subject: x\r\n", b"\r\n"], lambda line: None,
                                                      lambda *n: None)
    assert outcome.redirect == "boss@example.com"
