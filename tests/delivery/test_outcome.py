"""Delivery outcomes: an SMTP server's reply read as sent, deferred or bounced."""

from __future__ import annotations

from trimail.delivery.outcome import classify
from trimail.smtp.client import ReplyParser


def test_classify_uses_reply_class_and_enhanced_code():
    parser = ReplyParser()
    parser.feed(b"452 4.2.2 full\r\n554 no way\r\n")
    temp = classify(parser.next_reply(), "mx[1.2.3.4]", "RCPT TO")
    perm = classify(parser.next_reply(), "mx[1.2.3.4]", "end of DATA")
    assert (temp.status, temp.dsn) == ("deferred", "4.2.2")
    assert (perm.status, perm.dsn) == ("bounced", "5.0.0")
    assert perm.text == "host mx[1.2.3.4] said: 554 no way (in reply to end of DATA command)"
