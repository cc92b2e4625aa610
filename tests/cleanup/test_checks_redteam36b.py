"""Red team 36b: the scan's input and output, pure (trimail.cleanup.lines.message_lines,
trimail.cleanup.checks.ContentChecks)."""

from __future__ import annotations

import re
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from trimail.cleanup.checks import ContentChecks
from trimail.cleanup.lines import message_lines
from trimail.maps import open_table
from trimail.queue.spool import Spool
from trimail.receive.checks import SCAN_CHUNK


def _spool(tmp_path, data: bytes) -> Spool:
    spool = Spool(tmp_path, memory_limit=1 << 16)
    spool.write(data)
    return spool


def _lines(spool: Spool):
    """The spool's 64 KiB chunks cut into whole lines (receive/checks.py takes a long one in
    pieces: tests/cleanup/test_checks_pieces.py)."""
    return message_lines(spool.chunks(SCAN_CHUNK))


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
    """The line reader appended each 64 KiB chunk to the line so far by copying it: a 48 MB
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
    """Lines as message_lines cuts them: after each newline (a bare CR is no end of line)."""
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


PART_HEADER_MESSAGE = [b"Content-Type: multipart/mixed; boundary=b\r\n", b"\r\n", b"--b\r\n",
                       b"X-Part: start\r\n", *[b" " + b"a" * 98 + b"\r\n"] * 200_000, b"X-After: kept\r\n",
                       b"\r\n", b"part body\r\n", b"--b--\r\n"]


def _regexp(tmp_path, text: str):
    path = tmp_path / "checks"
    path.write_text(text)
    return open_table(f"regexp:{path}")


def test_a_part_header_folded_to_20_mb_is_bounded_by_header_size_limit(tmp_path) -> None:
    """header_size_limit bounds the primary header section only: a multipart part's
    header folded 200,000 times (20 MB) was held whole, joined and decoded (three
    copies in memory) and every rule ran over all 20 MB of it.  Postfix's MIME
    parser keeps header_size_limit bytes of any header; trimail now looks it up by
    those and passes its other lines on as they come."""
    import tracemalloc

    table = _regexp(tmp_path, "/^X-Part:(.{30000}){6}/ REJECT seen past header_size_limit\n/^X-After/ WARN after\n")
    checks = ContentChecks([table], [table], [table], [], header_limit=102400)
    size = [0]
    notes: list[tuple] = []

    def out(line: bytes) -> None:
        size[0] += len(line)

    tracemalloc.start()
    try:
        outcome = checks.scan(iter(PART_HEADER_MESSAGE), out, lambda *n: notes.append(n))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert outcome.reject is None
    assert size[0] == sum(map(len, PART_HEADER_MESSAGE))  # nothing lost
    assert [n[0] for n in notes] == ["warning"]  # the next header is still a header
    assert peak < 4 << 20, peak


def test_ignore_of_an_overlong_part_header_drops_all_its_lines(tmp_path) -> None:
    """A guard for the above: IGNORE (and REPLACE) of a header past header_size_limit
    drops its lines not yet seen too, as Postfix discards the excess."""
    table = _regexp(tmp_path, "/^X-Part:/ IGNORE\n")
    out: list[bytes] = []
    ContentChecks([table], [table], [table], [], header_limit=1000).scan(iter(PART_HEADER_MESSAGE[:2000] + [
        b"X-After: kept\r\n", b"\r\n", b"part body\r\n", b"--b--\r\n"]), out.append, lambda *n: None)
    text = b"".join(out)
    assert b"aaaa" not in text and b"X-Part" not in text
    assert text.endswith(b"--b\r\nX-After: kept\r\n\r\npart body\r\n--b--\r\n")
