"""Red team (session 34): header fields the stdlib's email parser (Python 3.11)
raises on, in mail an application sent to a real TestMTA.  ``message.subject``,
``text``, ``attachments``, ``headers`` and the waits that look at them raised
UnicodeEncodeError, AttributeError or IndexError into the user's test."""

from __future__ import annotations

import smtplib

import pytest

from trimail.testing import MTAAssertionError, TestMTA

HOST = "127.0.34.150"


@pytest.fixture
def mta():
    with TestMTA(smtpd_listen=f"{HOST}:0") as mta:
        yield mta


def send(mta, raw: bytes) -> None:
    with smtplib.SMTP(HOST, mta.port, timeout=30) as client:
        client.sendmail("app@example.org", ["ann@example.com"], raw)


def test_a_utf7_subject_that_decodes_to_a_lone_surrogate_can_be_waited_for(mta):
    send(mta, b"Subject: Welcome =?utf-7?q?+2AA-?=\r\n\r\nhello\r\n")
    [message] = mta.wait_for(subject="Welcome")
    assert message.subject.startswith("Welcome ")
    assert message.headers["subject"] == message.subject
    with pytest.raises(MTAAssertionError, match="subject 'Reset' not in 'Welcome "):
        mta.wait_for(subject="Reset", timeout=0.1)


def test_a_utf7_file_name_does_not_break_text_or_attachments(mta):
    send(mta, b'Content-Type: multipart/mixed; boundary="b"\r\nSubject: file\r\n\r\n'
              b"--b\r\nContent-Type: text/plain\r\n\r\nthe text\r\n"
              b"--b\r\nContent-Type: application/pdf\r\n"
              b"Content-Disposition: attachment; filename*=utf-7''report+2AA-.pdf\r\n\r\n%PDF\r\n--b--\r\n")
    [message] = mta.wait_for(attachment="report", body="the text")
    assert message.text == "the text"
    [pdf] = message.attachments
    assert pdf.content_type == "application/pdf" and pdf.data.startswith(b"%PDF")


@pytest.mark.parametrize("field", [b"To: ann@[", b"Message-ID: <<>>"])
def test_malformed_fields_are_listed_and_matched_not_raised(mta, field):
    send(mta, field + b"\r\nSubject: odd\r\nX-Tag: yes\r\n\r\nbody\r\n")
    [message] = mta.wait_for(header=("X-Tag", "yes"), subject="odd")
    name = field.split(b":")[0].decode()
    assert [n for n, _ in message.headers.fields()][:1] == ["Received"]
    assert name in [n for n, _ in message.headers.fields()]
    assert field.split(b": ", 1)[1].decode() in str(message.headers[name])
    assert mta.wait_for(header=(name, "<"if name == "Message-ID" else "ann"))


@pytest.mark.parametrize("content_type", [b"", b"Content-Type: text/plain\r\n", b"Content-Type: text/html\r\n"])
def test_an_undeclared_utf8_body_is_read_as_utf8(mta, content_type):
    body = "<p>Grüße, 493817</p>" if b"html" in content_type else "Grüße, 493817"
    send(mta, b"Subject: hi\r\n" + content_type + b"Content-Transfer-Encoding: 8bit\r\n\r\n" + body.encode() + b"\r\n")
    [message] = mta.wait_for(body="Grüße")
    assert (message.html if b"html" in content_type else message.text) == body + "\n"
    assert message.extract(r"Grüße, (\d+)") == "493817"
