"""Red team 38's fourth lead: the scan took a long line whole (one 40 MB line peaked at
163 MB: gathered, copied to bytes, stripped, its rest sliced), four scans of them
750 MB.  ``ContentChecks.lines`` now hands a long line over in pieces of a multiple of
line_length_limit, and the scan looks it up at the same places as whole: the pieces
must change nothing but the memory."""

from __future__ import annotations

import re
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trimail.cleanup.checks import ContentChecks
from trimail.cleanup.lines import message_lines
from trimail.maps import open_table

SEEN = "/^(.*)$/ WARN $1\n"  # every lookup's text, as a note
STRAY_CR = re.compile(rb"\r(?!\n)")

LINE = st.one_of(
    st.sampled_from([b"", b"X: y", b" folded", b"\tfolded", b"--b", b"--b--", b"Subject: s",
                     b"Content-Type: multipart/mixed; boundary=b", b"Content-Type: message/rfc822",
                     b"MIME-Version: 1.0", b"\r", b"tail\r"]),
    st.builds(lambda head, n, ch: head + ch * n, st.sampled_from([b"", b"X-Long: ", b" ", b"--b", b"body "]),
              st.integers(min_value=0, max_value=130), st.sampled_from([b"a", b"ab", b"a\r"])),
)
RULES = st.sampled_from([  # each ends with SEEN: every lookup is noted
    SEEN,
    "/^(.*)$/ REPLACE X-Was: $1\n",
    "/a{9}/ IGNORE\n" + SEEN,
    "/^X-Long/ PREPEND X-Pre: p\n/aaaa/ REPLACE X-R: r\n" + SEEN,
    "/a{40}/ REJECT long\n" + SEEN,
])


def _checks(tmp_path, rules: str, line_limit: int, header_limit: int, body_limit: int) -> ContentChecks:
    path = tmp_path / "rules"
    path.write_text(rules)
    table = [open_table(f"regexp:{path}")]
    return ContentChecks(table, table, table, table, body_limit=body_limit, line_limit=line_limit,
                         header_limit=header_limit)


def _run(checks: ContentChecks, lines):
    out: list[bytes] = []
    notes: list[tuple] = []
    outcome = checks.scan(lines, out.append, lambda *note: notes.append(note))
    return b"".join(out), notes, outcome


@given(st.lists(LINE, max_size=40), st.sampled_from([b"\r\n", b"\n"]), st.booleans(), RULES,
       st.integers(min_value=1, max_value=40), st.integers(min_value=1, max_value=4),
       st.integers(min_value=1, max_value=200), st.integers(min_value=0, max_value=400),
       st.integers(min_value=1, max_value=97))
@settings(max_examples=400, deadline=None)
def test_a_line_in_pieces_is_looked_up_and_written_as_the_whole_line(
        tmp_path_factory, lines, newline, final, rules, line_limit, times, header_limit, body_limit, chunk):
    times = max(times, -(-16 // line_limit))  # a first piece holds a header's name or a boundary (below)
    data = newline.join(lines) + (newline if final and lines else b"")
    chunks = [data[at:at + chunk] for at in range(0, len(data), chunk)]
    checks = _checks(tmp_path_factory.mktemp("t"), rules, line_limit, header_limit, body_limit)
    pieces = list(message_lines(chunks, line_limit * times))
    assert b"".join(pieces) == data
    assert all(b"\n" not in piece[:-1] for piece in pieces)
    assert all(len(piece) <= line_limit * times for piece in pieces)
    in_pieces, whole = _run(checks, iter(pieces)), _run(checks, message_lines(chunks))
    if STRAY_CR.search(data) is None:
        assert in_pieces == whole
    else:  # a stray CR at a piece's end is not looked up (as the CR of a CRLF); the bytes are the same
        assert in_pieces[0] == whole[0] or rules != SEEN


def test_a_header_name_or_boundary_is_seen_in_a_lines_first_piece_only():
    """What pieces do change, by design: a line is a header, or a boundary, by its first
    piece (at least 64 KiB; Postfix decides by its first record of line_length_limit
    bytes, 2048): here pieces of 4 bytes make ``X-Long:`` a body line."""
    no_tables = ContentChecks([], [], [], [], line_limit=4)
    out, notes, _ = _run(no_tables, message_lines([b"X-Long: y\r\n\r\nbody\r\n"], 4))
    assert out == b"X-Long: y\r\n\r\nbody\r\n" and notes == []


@pytest.mark.parametrize("rule, expected", [
    ("REPLACE X-R: r", b"X-R: r\r\nX-R: r\r\n"),
    ("IGNORE", b""),
    ("PREPEND X-P: p", b"X-P: p\r\naaaaX-P: p\r\naaaa\r\n"),
    ("WARN w", b"aaaaaaaa\r\n"),
])
def test_a_lines_end_in_a_piece_of_its_own_goes_where_the_piece_before_went(tmp_path, rule, expected):
    """A line of two line_length_limit pieces cut before its CRLF: each piece is looked
    up as whole, and the CRLF goes with the last one (dropped with a REPLACE or IGNORE)."""
    checks = _checks(tmp_path, f"/^a/ {rule}\n", 4, 1000, 1000)
    message = b"\r\n" + b"a" * 8 + b"\r\n"
    for longest in (8, 0):
        out, _, _ = _run(checks, message_lines([message], longest))
        assert out == b"\r\n" + expected, longest


def test_pieces_are_cut_from_the_start_of_their_line():
    data = b"ab\r\n" + b"x" * 25 + b"\r\n" + b"y" * 20
    for chunk in (1, 3, 7, 64):
        pieces = list(message_lines([data[at:at + chunk] for at in range(0, len(data), chunk)], 10))
        assert pieces == [b"ab\r\n", b"x" * 10, b"x" * 10, b"xxxxx\r\n", b"y" * 10, b"y" * 10], chunk


def test_a_40_mb_line_is_scanned_in_bounded_memory(tmp_path):
    """One 40 MB body line took the scan 163 MB; with a body rule it is now looked up in
    line_length_limit pieces without being held whole."""
    checks = _checks(tmp_path, "/^zzz/ REJECT no\n", 2048, 102400, 51200)
    line = b"x" * (1 << 20)
    chunks = [b"Subject: s\r\n\r\n"] + [line] * 40 + [b"\r\nend\r\n"]
    written = [0]

    def out(data: bytes) -> None:
        written[0] += len(data)

    tracemalloc.start()
    try:
        outcome = checks.scan(checks.lines(iter(chunks)), out, lambda *note: None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert outcome.reject is None and written[0] == sum(map(len, chunks))
    assert peak < 8 << 20, peak
