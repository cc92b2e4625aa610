"""The Mailpit view of a message (trimail/catch/mime.py), pure: part IDs as enmime
numbers them, Text and HTML, attachments versus inline parts, header fields as Go's
net/mail reads them, Go's time format."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from trimail.catch.mime import MessageView, canonical_key, go_time, header_fields
from trimail.catch.store import Mailbox, arguments, with_envelope
from trimail.catch.text import shared_budget

NESTED = (b"From: A <a@example.org>\r\nTo: b@example.com, \"C, D\" <c@example.com>\r\nSubject: nested\r\n"
          b"Content-Type: multipart/mixed; boundary=outer\r\n\r\n"
          b"--outer\r\nContent-Type: multipart/related; boundary=rel\r\n\r\n"
          b"--rel\r\nContent-Type: multipart/alternative; boundary=alt\r\n\r\n"
          b"--alt\r\nContent-Type: text/plain\r\n\r\nplain\r\n"
          b"--alt\r\nContent-Type: text/html\r\n\r\n<p>html <img src=cid:logo></p>\r\n--alt--\r\n"
          b"--rel\r\nContent-Type: image/png\r\nContent-ID: <logo>\r\nContent-Transfer-Encoding: base64\r\n\r\n"
          b"iVBORw0K\r\n--rel--\r\n"
          b"--outer\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename=a.bin\r\n"
          b"\r\nxyz\r\n--outer--\r\n")


def test_part_ids_text_html_inline_and_attachments_of_a_nested_message():
    view = MessageView(NESTED)
    assert view.bodies == ("plain", "<p>html <img src=cid:logo></p>")
    attachments, inline = view.listed()
    assert [(p.part_id, p.filename) for p in attachments] == [("2", "a.bin")]
    assert [(p.part_id, p.content_id, p.content_type) for p in inline] == [("1.2", "logo", "image/png")]
    assert view.part("1.1.1").content == b"plain"  # the alternative is 1.1.0, its parts 1.1.1 and 1.1.2
    assert view.part("1.0") is None  # a multipart part has no content of its own
    assert view.addresses("To") == [{"Name": "", "Address": "b@example.com"},
                                    {"Name": "C, D", "Address": "c@example.com"}]


def test_an_html_only_message_gets_a_text_made_from_its_html():
    view = MessageView(b"Subject: x\r\nContent-Type: text/html\r\n\r\n<p>Hello <b>you</b></p><script>x()</script>")
    text, html = view.bodies
    assert text == "Hello you" and html.startswith("<p>Hello")


def test_several_plain_parts_of_a_mixed_message_are_joined_as_enmime_joins_them():
    raw = (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\none\r\n"
           b"--b\r\nContent-Type: text/plain\r\nContent-Disposition: inline; filename=n.txt\r\n\r\ntwo\r\n--b--\r\n")
    view = MessageView(raw)
    assert view.bodies[0] == "one\n--\ntwo"
    assert [(p.part_id, p.filename) for p in view.listed()[1]] == [("2", "n.txt")]


def test_header_fields_are_unfolded_and_named_as_go_names_them():
    raw = b"message-id: <x@y>\r\nARC-Seal: i=1;\r\n        b=abc\r\n         def\r\nX Bad: v\r\n\r\nbody"
    assert header_fields(raw) == [("Message-Id", "<x@y>"), ("Arc-Seal", "i=1; b=abc def"), ("X Bad", "v")]
    assert canonical_key("content-TYPE") == "Content-Type"


def test_go_time_forms():
    assert go_time(datetime(2022, 7, 27, 15, 44, 41, tzinfo=timezone(timedelta(hours=12)))) == \
        "2022-07-27T15:44:41+12:00"
    assert go_time(datetime(2022, 7, 27, 3, 44, 41, 120000, tzinfo=UTC)) == "2022-07-27T03:44:41.12Z"


def test_return_path_and_bcc_from_the_envelope():
    raw = b"Return-Path: <old@example.org>\r\nTo: b@example.com\r\n\r\nx"
    out = with_envelope(raw, "new@example.org", ["b@example.com", "hidden@example.net"])
    assert out.startswith(b"Return-Path: <new@example.org>\r\nBcc: hidden@example.net\r\n")
    assert b"old@example.org" not in out
    same = b"Return-Path: <a@example.org>\r\nTo: b@example.com\r\n\r\nx"
    assert with_envelope(same, "a@example.org", ["B@example.com"]) == same


def test_query_words_split_outside_quotes():
    assert arguments('subject:"two words" to:bob  -is:read') == ["subject:two words", "to:bob", "-is:read"]


def test_html_the_shared_budget_leaves_unread_is_kept_nowhere_and_read_later():
    raw = b"From: a@example.org\r\nSubject: h\r\nContent-Type: text/html\r\n\r\n<p>hello there</p>"
    mailbox = Mailbox()
    stored = mailbox.add_raw(raw)
    with shared_budget(0):  # a request whose budget is spent
        assert stored.view.snippet == "" and stored.view.search_text() is None
        assert mailbox.search("hello") == ([], 1) and mailbox.search("subject:zzz hello") == ([], 0)
        assert mailbox.search("subject:h", first=True) == ([stored], 0)  # no text needed
        assert stored.view.bodies == ("hello there", "<p>hello there</p>")  # the message shown: its own budget
    fresh = MessageView(raw)
    with shared_budget(0):
        assert fresh.snippet == ""
    with shared_budget(1):  # a later request
        assert fresh.snippet == "hello there" and "hello there" in (fresh.search_text() or "")
    with shared_budget(0):
        assert fresh.snippet == "hello there"  # kept once read
