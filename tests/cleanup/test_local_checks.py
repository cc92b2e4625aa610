"""header_checks and body_checks on locally submitted mail (trimail/cleanup/inspection.py),
as Postfix's cleanup applies them to mail from pickup: root's ``trimail sendmail`` (a
real process writing the queue itself) and ``sendmail -bs``; a user's submission that
serve's pickup takes: tests/faults/test_local_submission.py.  A REJECT is sendmail's refusal (exit 69, 75 for a 4.x.x text)
and nothing is queued; the other actions act on what is queued."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import write_main_cf
from tests.milter.test_sendmail import queued as queue
from trimail.cleanup.loglines import LOG_PARAM
from trimail.delivery.notify import SILENT_PARAM
from trimail.delivery.route import CHECKS_FILTER_PARAM
from trimail.queue import transitions
from trimail.queue.store import Store
from trimail.queue.transitions import PICKUP_HOLD_PARAM

HEADER_CHECKS = """\
/^Subject: .*forbidden/ REJECT 5.7.1 Not this subject
/^Subject: .*later/ REJECT 4.7.1 Not now
/^Subject: hold me/ HOLD
/^Subject: drop me/ DISCARD
/^Subject: elsewhere/ REDIRECT archive@remote.example
/^X-Internal:/ IGNORE
/^Subject: tag me/ PREPEND X-Tagged: yes
/^Subject: filter me/ FILTER smtp:[127.0.0.9]:10026
/^Subject: copy me/ BCC copy@remote.example
"""
BODY_CHECKS = "/secret/ REPLACE [redacted]\n"


def config(tmp_path: Path, **params) -> Path:
    (tmp_path / "hc").write_text(HEADER_CHECKS)
    (tmp_path / "bc").write_text(BODY_CHECKS)
    settings = {"myorigin": "example.com", "alias_maps": "", "alias_database": "",
                "header_checks": f"regexp:{tmp_path / 'hc'}", "body_checks": f"regexp:{tmp_path / 'bc'}"}
    return write_main_cf(tmp_path, **{**settings, **params})


def stored(tmp_path: Path) -> list[tuple[str, dict]]:
    """(state, params) of each message in the queue."""
    store = Store.open(tmp_path / "queue", readonly=True)
    try:
        return [(state, json.loads(params)) for state, params in store.db.execute("SELECT state, params FROM message")]
    finally:
        store.close()


def sendmail(config_path: Path, *args: str, data: bytes) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trimail", "sendmail", "-c", str(config_path), *args],
                          input=data, capture_output=True, timeout=60, check=False)


def test_a_reject_is_sendmails_refusal_and_nothing_is_queued(tmp_path):
    path = config(tmp_path)
    result = sendmail(path, "bob@remote.example", data=b"Subject: a forbidden thing\n\nhi\n")
    assert result.returncode == 69
    assert b"message content rejected: 5.7.1 Not this subject" in result.stderr
    later = sendmail(path, "bob@remote.example", data=b"Subject: try later\n\nhi\n")
    assert later.returncode == 75, later.stderr
    assert queue(path) == []


def test_edits_hold_discard_and_redirect_act_on_what_is_queued(tmp_path):
    path = config(tmp_path)
    letter = b"Subject: hold me\nX-Internal: yes\n\nmy secret here\nand the rest\n"
    assert sendmail(path, "bob@remote.example", data=letter).returncode == 0
    [(held, content)] = queue(path)
    # held once serve's pickup takes it (its log lines written then: cleanup/loglines.py)
    assert held["state"] == "maildrop" and PICKUP_HOLD_PARAM in stored(tmp_path)[0][1]
    store = Store.open(tmp_path / "queue")
    try:
        with store.transaction():
            transitions.promote_maildrop(store)
    finally:
        store.close()
    assert queue(path)[0][0]["state"] == "hold"
    assert b"X-Internal" not in content and b"secret" not in content
    assert b"\n[redacted]\r\nand the rest" in content  # the line replaced, the rest kept
    assert sendmail(path, "bob@remote.example", data=b"Subject: drop me\n\nx\n").returncode == 0
    assert len(queue(path)) == 1  # discarded: not queued, and sendmail says nothing went wrong
    assert sendmail(path, "bob@remote.example", data=b"Subject: elsewhere\n\nx\n").returncode == 0
    assert sendmail(path, "bob@remote.example", data=b"Subject: tag me\n\nx\n").returncode == 0
    by_subject = {c.split(b"Subject: ")[1].split(b"\r\n")[0].split(b"\n")[0]: (m, c) for m, c in queue(path)}
    redirected, _ = by_subject[b"elsewhere"]
    assert [r["address"] for r in redirected["recipients"]] == ["archive@remote.example"]
    _, tagged = by_subject[b"tag me"]
    assert tagged.index(b"X-Tagged: yes") < tagged.index(b"Subject: tag me")


def test_no_header_body_checks_leaves_local_mail_alone(tmp_path):
    path = config(tmp_path, receive_override_options="no_header_body_checks")
    assert sendmail(path, "bob@remote.example", data=b"Subject: a forbidden thing\n\nsecret\n").returncode == 0
    [(_, content)] = queue(path)
    assert b"secret" in content


def test_sendmail_bs_answers_a_reject_with_554(tmp_path):
    path = config(tmp_path)
    session = (b"EHLO client.example\r\nMAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@remote.example>\r\n"
               b"DATA\r\nSubject: a forbidden thing\r\n\r\nhi\r\n.\r\nQUIT\r\n")
    result = sendmail(path, "-bs", data=session)
    replies = result.stdout.decode().splitlines()
    assert any(line.startswith("554 ") and "5.7.1 Not this subject" in line for line in replies), replies
    assert queue(path) == []



def test_a_filter_is_stored_for_pickup_to_put_in_place_of_its_content_filter(tmp_path):
    path = config(tmp_path, content_filter="smtp:[127.0.0.1]:10024")
    assert sendmail(path, "bob@remote.example", data=b"Subject: filter me\n\nx\n").returncode == 0
    [(state, params)] = stored(tmp_path)
    params.pop(LOG_PARAM)
    assert state == "maildrop" and params == {CHECKS_FILTER_PARAM: "smtp:[127.0.0.9]:10026"}


def test_a_bcc_adds_a_recipient(tmp_path):
    path = config(tmp_path)
    assert sendmail(path, "bob@remote.example", data=b"Subject: copy me\n\nx\n").returncode == 0
    [(message, _)] = queue(path)
    assert [r["address"] for r in message["recipients"]] == ["bob@remote.example", "copy@remote.example"]
    [(_, params)] = stored(tmp_path)
    assert json.loads(params[SILENT_PARAM]) == ["copy@remote.example"]  # never reported to the sender


def test_strip_drops_a_line_and_pass_ends_the_checks(tmp_path):
    (tmp_path / "extra").write_text("/^X-Strip:/ STRIP stripped\n/^Subject: trusted/ PASS\n")
    path = config(tmp_path, header_checks=f"regexp:{tmp_path / 'extra'}, regexp:{tmp_path / 'hc'}")
    result = sendmail(path, "bob@remote.example", data=b"X-Strip: yes\nSubject: trusted\nX-Internal: kept\n\n"
                                                       b"my secret stays\n")
    assert result.returncode == 0, result.stderr
    [(message, content)] = queue(path)
    assert b"X-Strip" not in content
    assert b"X-Internal: kept" in content and b"my secret stays" in content  # nothing checked after PASS


def test_the_log_lines_are_kept_for_serve_to_write(tmp_path):
    # root's sendmail has no mail log: pickup's and cleanup's lines go with the message
    # (cleanup/loglines.py; serve writes them: tests/faults/test_local_submission.py)
    path = config(tmp_path)
    letter = b"Subject: tag me\nMessage-ID: <m1@example.com>\n\nx\n"
    assert sendmail(path, "-f", "alice@example.com", "bob@remote.example", data=letter).returncode == 0
    [(state, params)] = stored(tmp_path)
    [queue_id] = [m["id"] for m, _ in queue(path)]
    assert json.loads(params[LOG_PARAM]) == [
        ["pickup", 20, f"{queue_id}: uid=0 from=<alice@example.com>"],
        ["cleanup", 20, f"{queue_id}: prepend: header Subject: tag me from local; from=<alice@example.com> "
                        "to=<bob@remote.example>: X-Tagged: yes"],
        ["cleanup", 20, f"{queue_id}: message-id=<m1@example.com>"]]
