"""Red team 37: an action's text made from the client's header or body line (``$1``)
carries its control characters (a folded header's newline, ESC, BEL) into the mail
log and into the SMTP reply.  ``REJECT no $1`` on ``Subject: rejA\\r\\n 250 fake``
answered ``550 5.7.1 no A\\n 250 fake``: a bare LF inside the reply, which a client
reads as a second reply line (swaks took `` 250 fake`` as its QUIT's answer), and the
log line was cut in two; ``WARN $1`` wrote ESC sequences to the log.  Postfix's msg
functions write every control character as ``?``, as trimail already did for the
logged header text itself.  The text stays as it was where it is not shown: a
PREPEND's header."""

from __future__ import annotations

from tests.cleanup.test_checks import scan, table
from trimail.cleanup.checks import ContentChecks


def checks_of(tmp_path, rules: str) -> ContentChecks:
    return ContentChecks(table(tmp_path, "h", rules), [], [], table(tmp_path, "b", "/^B(.*)/ WARN body $1\n"))


def test_a_reject_text_from_the_header_has_no_control_characters(tmp_path):
    outcome, _, notes = scan(checks_of(tmp_path, "/^Subject: rej(.*)/ REJECT no $1\n"),
                             "Subject: rejA\n 250 fake\x1b[2J\n\nbody")
    assert outcome.reject == "5.7.1 no A? 250 fake?[2J"
    assert notes[0][3] == "5.7.1 no A? 250 fake?[2J"


def test_a_logged_action_text_has_no_control_characters(tmp_path):
    _, out, notes = scan(checks_of(tmp_path, "/^Subject: w(.*)/ WARN got $1\n/^X-P: (.*)/ PREPEND X-Was: $1\n"),
                         "Subject: wA\n two\x07\nX-P: p\x1b\n\nB\x1b]0;title\x07")
    assert [arg for _, _, _, arg in notes] == ["got A? two?", "X-Was: p?", "body ?]0;title?"]
    assert "X-Was: p\x1b\r\n" in out  # the header added is the table's, as it was


def test_a_reject_reply_fits_one_smtp_line(tmp_path):
    outcome, _, _ = scan(checks_of(tmp_path, "/^Subject: (.*)/ REJECT $1\n"), "Subject: " + "x" * 5000 + "\n\nbody")
    assert len(outcome.reject) < 500
