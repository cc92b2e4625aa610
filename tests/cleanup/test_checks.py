"""trimail/cleanup/checks.py without an MTA: which table sees which line, and what the
actions do to the content (tests/differential/checks.py compares the same with Postfix)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from trimail.cleanup.checks import ContentChecks
from trimail.maps import open_table


def table(tmp_path, name: str, text: str):
    (tmp_path / name).write_text(text)
    return [open_table(f"regexp:{tmp_path / name}")]


def scan(checks: ContentChecks, message: str):
    out: list[bytes] = []
    notes: list[tuple[str, str, str, str]] = []
    lines = [line.encode() + b"\r\n" for line in message.split("\n")]
    outcome = checks.scan(lines, out.append, lambda *note: notes.append(note))
    return outcome, b"".join(out).decode(), notes


MIME = ("Subject: s\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=b\n\n--b\n"
        "Content-Type: message/rfc822\nX-Part: p\n\nX-Inner: i\n\ninner body\n--b--")


def test_each_header_class_has_its_own_table(tmp_path):
    checks = ContentChecks(table(tmp_path, "h", "/^(Subject|X-Part|X-Inner):/ WARN header_checks\n"),
                           table(tmp_path, "m", "/^(Content-Type|X-Part|X-Inner):/ WARN mime\n"),
                           table(tmp_path, "n", "/^X-Inner:/ WARN nested\n"),
                           table(tmp_path, "b", "/^(X-|inner|--b)/ WARN body\n"))
    _, out, notes = scan(checks, MIME)
    assert out == MIME.replace("\n", "\r\n") + "\r\n"
    assert [(what, text, arg) for _, what, text, arg in notes] == [
        ("header", "Subject: s", "header_checks"),
        ("header", "Content-Type: multipart/mixed; boundary=b", "mime"),
        ("body", "--b", "body"),
        ("header", "Content-Type: message/rfc822", "mime"),
        ("header", "X-Part: p", "mime"),  # a part's header: mime_header_checks
        ("header", "X-Inner: i", "nested"),  # the attached message's: nested_header_checks
        ("body", "inner body", "body"),
        ("body", "--b--", "body"),
    ]


def test_a_boundary_with_capital_letters_is_found_and_its_parts_headers_are_checked(tmp_path):
    """Red team 38: the boundary was taken from the lower-cased Content-Type, so
    "--Part_Abc" never matched "part_abc": a part's headers went unchecked by
    mime_header_checks (an .exe attachment passed a REJECT rule), and the body
    limit never started again per part.  RFC 2046 boundaries are case-sensitive."""
    checks = ContentChecks([], table(tmp_path, "m", '/^Content-Type:.*name=.*\\.exe/ REJECT exe attachment\n'), [],
                           table(tmp_path, "b", "/^bad/ REJECT\n"), body_limit=20)
    message = ("Subject: s\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"----=_Part_1_Abc\"\n\n"
               "------=_Part_1_Abc\nContent-Type: text/plain\n\n{}\n"
               "------=_Part_1_Abc\nContent-Type: application/octet-stream; name=\"x.exe\"\n\nTVqQ\n"
               "------=_Part_1_Abc--")
    assert scan(checks, message.format("hello"))[0].reject == "5.7.1 exe attachment"
    # the body limit starts again with each part: "bad" at the start of the second is seen
    second_bad = message.replace("TVqQ", "bad").replace("x.exe", "x.txt").format("x" * 30)
    assert scan(checks, second_bad)[0].reject == "5.7.1 message content rejected"


def test_edits_and_the_first_reject_ends_the_checks(tmp_path):
    checks = ContentChecks(table(tmp_path, "h", "/^X-Old: (.*)/ REPLACE X-New: $1\n/^X-Gone:/ IGNORE\n"
                                 "/^Subject:/ PREPEND not a header\n"), [], [],
                           table(tmp_path, "b", "/^stop/ REJECT 4.7.0 later\n/^after/ HOLD\n"))
    outcome, out, notes = scan(checks, "X-Old: v\nX-Gone: g\nSubject: s\n\nbefore\nstop\nafter")
    assert out == "X-New: v\r\nSubject: s\r\n\r\nbefore\r\nafter\r\n"
    assert (outcome.reject, outcome.hold, outcome.edited) == ("4.7.0 later", False, True)
    assert ("warning", "", "PREPEND action without valid header", "") in notes


def test_body_checks_stop_after_the_size_limit(tmp_path):
    checks = ContentChecks([], [], [], table(tmp_path, "b", "/^bad/ REJECT\n"), body_limit=20)
    assert scan(checks, "S: s\n\n" + "x" * 30 + "\nbad")[0].reject is None
    assert scan(checks, "S: s\n\nbad")[0].reject == "5.7.1 message content rejected"


def test_strip_drops_the_line_with_a_note_and_pass_ends_the_checks(tmp_path):
    checks = ContentChecks(table(tmp_path, "h", "/^X-Strip:/ STRIP stripped\n/^Subject: ok/ PASS trusted\n"
                                 "/^X-After:/ REJECT\n"), [], [], table(tmp_path, "b", "/^strip/ STRIP\n/^bad/ REJECT\n"))
    outcome, out, notes = scan(checks, "X-Strip: x\nSubject: s\n\nstrip me\nkept")
    assert out == "Subject: s\r\n\r\nkept\r\n"
    assert outcome.edited and not outcome.passed
    assert [(action, what, text, arg) for action, what, text, arg in notes] == [
        ("strip", "header", "X-Strip: x", "stripped"), ("strip", "body", "strip me", "")]
    outcome, out, notes = scan(checks, "Subject: ok\nX-After: 1\nX-Strip: y\n\nbad")
    assert outcome.passed and outcome.reject is None and not outcome.edited
    assert out == "Subject: ok\r\nX-After: 1\r\nX-Strip: y\r\n\r\nbad\r\n"  # nothing looked up after PASS
    assert notes == [("pass", "header", "Subject: ok", "trusted")]


def _reference_body_lookups(lines: list[bytes], line_limit: int, body_limit: int) -> list[bytes]:
    """The pieces of each body line that body_checks looks up, as trimail looked them
    up before red team 38 (every piece made, those past the limit not looked up)."""
    looked, seen = [], 0
    for line in lines:
        stripped = line.rstrip(b"\r\n")
        pieces = [line] if len(stripped) <= line_limit else [
            stripped[i:i + line_limit] for i in range(0, len(stripped), line_limit)]
        for number, piece in enumerate(pieces, 1):
            if seen < body_limit:
                looked.append(piece.rstrip(b"\r\n"))
            seen += len(piece) + (len(line) - len(stripped) if number == len(pieces) > 1 else 0)
    return looked


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(0, 300), min_size=1, max_size=12), line_limit=st.integers(1, 40),
       body_limit=st.integers(0, 400))
def test_long_body_lines_are_looked_up_up_to_the_size_limit_and_pass_whole(tmp_path_factory, lengths, line_limit,
                                                                          body_limit):
    """Red team 38: past body_checks_size_limit the rest of a long line is no longer
    cut into pieces; the pieces looked up, and the output, are what they were."""
    directory = tmp_path_factory.mktemp("t")
    checks = ContentChecks([], [], [], table(directory, "b", "/^(.*)$/ WARN seen $1\n"),
                           body_limit=body_limit, line_limit=line_limit)
    lines = [bytes([0x61 + i % 26]) * n + b"\r\n" for i, n in enumerate(lengths)]
    out: list[bytes] = []
    notes: list[tuple[str, str, str, str]] = []
    checks.scan([b"Subject: s\r\n", b"\r\n", *lines], out.append, lambda *note: notes.append(note))
    assert b"".join(out) == b"Subject: s\r\n\r\n" + b"".join(lines)
    looked = [text.encode() for _, what, text, _ in notes if what == "body"]
    assert looked == _reference_body_lookups(lines, line_limit, body_limit)
