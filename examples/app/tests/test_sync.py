"""The shop's mail tested with the synchronous API: the ``trimail_mta`` fixture and
``TestMTA``."""

import asyncio

import aiosmtplib
import pytest
from trimail.testing import TestMTA

from shop import Smtp
from shop.accounts import send_password_reset
from shop.newsletter import send_newsletter


def smtp(mta):
    return Smtp(mta.host, mta.port)


def test_password_reset_mails_a_code_and_the_link(trimail_mta):
    token = send_password_reset(smtp(trimail_mta), "ann@example.com")
    [mail] = trimail_mta.wait_for(exactly=1, recipient="ann@example.com", subject="Reset your password")
    assert mail.links == [f"https://shop.example/reset?token={token}"]
    code = mail.extract(r"code is (\d{6})")
    assert code and f"<b>{code}</b>" in mail.html


def test_newsletter_has_text_html_and_a_pdf_for_each_subscriber():
    with TestMTA() as mta:
        asyncio.run(send_newsletter(smtp(mta), "spring sale", ["ann@example.com", "bob@example.com"]))
        mails = mta.wait_for(exactly=2, attachment="statement.pdf")
        assert [m.recipients for m in mails] == [["ann@example.com"], ["bob@example.com"]]
        for mail in mails:
            assert "This month: spring sale." in mail.text and "<h1>spring sale</h1>" in mail.html
            [pdf] = mail.attachments
            assert pdf.content_type == "application/pdf" and pdf.data.startswith(b"%PDF-1.4")
            assert mail.recipients[0].encode() in pdf.data


@pytest.mark.trimail(message_size_limit=1000)
def test_a_newsletter_too_big_for_the_server_is_refused_not_retried(trimail_mta):
    with pytest.raises(aiosmtplib.SMTPResponseException) as refused:
        asyncio.run(send_newsletter(smtp(trimail_mta), "spring sale", ["ann@example.com"]))
    assert refused.value.code == 552
    trimail_mta.assert_nothing_sent()
