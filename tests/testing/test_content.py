"""Content helpers on captured messages: text, HTML, attachments, links, extract,
headers, save; and the content criteria of wait_for.  Real messages, built with
the stdlib's email package and sent by smtplib to a TestMTA."""

from __future__ import annotations

import email
import email.policy
import smtplib
import time
from email.message import EmailMessage

import pytest
import trio

from trimail.testing import MTAAssertionError, TestMTA, open_test_mta
from trimail.testing.content import CapturedMessage

HOST = "127.0.47.1"
PDF = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n" + bytes(range(256))


@pytest.fixture
def mta():
    with TestMTA(smtpd_listen=f"{HOST}:0") as mta:
        yield mta


def send(mta, message: EmailMessage) -> None:
    with smtplib.SMTP(HOST, mta.port, timeout=30) as client:
        client.send_message(message)


def reset_mail() -> EmailMessage:
    message = EmailMessage()
    message["From"] = "App <app@app.example>"
    message["To"] = "Ann <ann@example.com>"
    message["Subject"] = "Reset your password"
    message.set_content("Hello Ann,\n\nyour one-time code is 493817.\n"
                        "Reset here: https://app.example/reset?token=abc123&u=ann.\n")
    message.add_alternative(
        '<html><body><p>Hello Ann,</p><p>Your code: <b id="code">493817</b></p>'
        '<p><a href="https://app.example/reset?token=abc123&amp;u=ann">Reset</a> or '
        '<a href="https://app.example/help">get help</a> <a href="#top">top</a></p></body></html>',
        subtype="html")
    return message


def invoice_mail() -> EmailMessage:
    message = EmailMessage()
    message["From"] = "billing@app.example"
    message["To"] = "ann@example.com"
    message["Subject"] = "Invoice 42"
    message.set_content("Your invoice is attached.\n")
    message.add_attachment(PDF, maintype="application", subtype="pdf", filename="invoice-42.pdf")
    message.add_attachment("a,b\n1,2\n", subtype="csv", filename="lines.csv")
    return message


def utf8_mail() -> EmailMessage:
    message = EmailMessage()
    message["From"] = "app@app.example"
    message["To"] = "zoe@example.com"
    message["Subject"] = "Grüße aus Zürich — €5"
    message.set_content("Grüße, Zoë! Ihr Code lautet: ÄÖÜ-7781 — bis bald.\n", cte="quoted-printable")
    return message


def test_text_html_links_and_extract_from_a_multipart_alternative(mta):
    send(mta, reset_mail())
    [m] = mta.wait_for(subject="Reset")
    assert m.message.get_content_type() == "multipart/alternative"
    assert m.text.startswith("Hello Ann,\n\nyour one-time code is 493817.")
    assert "<html>" not in m.text
    assert m.html.startswith("<html><body><p>Hello Ann,</p>") and "&amp;u=ann" in m.html
    assert m.attachments == []
    # the text's URL without the full stop ending the sentence, the HTML's hrefs unescaped, each once
    assert m.links == ["https://app.example/reset?token=abc123&u=ann", "https://app.example/help"]
    assert m.extract(r"code is (\d{6})") == "493817"
    assert m.extract(r'<b id="code">(\d+)</b>') == "493817"  # not in the text: found in the HTML
    assert m.extract(r"token=(\w+)") == "abc123"
    assert m.extract(r"\d{6}") == "493817"  # no group: the whole match
    assert m.extract(r"coupon (\w+)") is None
    assert m.text is m.text and m.message is m.message  # parsed once, cached


def test_headers_view(mta):
    send(mta, reset_mail())
    [m] = mta.wait_for()
    assert m.headers["subject"] == "Reset your password"
    assert m.headers["To"].addresses[0].addr_spec == "ann@example.com"
    assert "FROM" in m.headers and "X-Nope" not in m.headers
    assert m.headers.get("X-Nope") is None
    with pytest.raises(KeyError):
        m.headers["X-Nope"]
    assert len(m.headers.get_all("Received")) == 1 and m.headers.get_all("X-Nope") == []
    assert m.headers.fields()[0][0] == "Received"
    assert {"Received", "From", "To", "Subject", "Content-Type"} <= set(m.headers)


def test_attachments_keep_filename_type_and_exact_bytes(mta):
    send(mta, invoice_mail())
    [m] = mta.wait_for(attachment="invoice")
    assert m.text == "Your invoice is attached.\n" and m.html == ""
    pdf, csv = m.attachments
    assert (pdf.filename, pdf.content_type, pdf.data) == ("invoice-42.pdf", "application/pdf", PDF)
    assert (csv.filename, csv.content_type, csv.data) == ("lines.csv", "text/csv", b"a,b\r\n1,2\r\n")  # as on the wire
    assert "invoice-42.pdf" in repr(pdf) and f"{len(PDF)} bytes" in repr(pdf)


def test_non_ascii_quoted_printable_text_is_decoded(mta):
    send(mta, utf8_mail())
    [m] = mta.wait_for(text="Zoë")
    assert b"quoted-printable" in m.raw and "Zoë".encode() not in m.raw  # it travelled encoded
    assert m.text == "Grüße, Zoë! Ihr Code lautet: ÄÖÜ-7781 — bis bald.\n"
    assert m.subject == "Grüße aus Zürich — €5"
    assert m.extract(r"Code lautet: (\w+-\d+)") == "ÄÖÜ-7781"
    assert m.links == []


def test_save_writes_the_raw_bytes_as_eml(mta, tmp_path):
    send(mta, invoice_mail())
    [m] = mta.wait_for()
    path = m.save(tmp_path / "invoice.eml")
    assert path == tmp_path / "invoice.eml" and path.read_bytes() == m.raw
    into_directory = m.save(tmp_path)
    assert into_directory == tmp_path / f"{m.queue_id}.eml" and into_directory.read_bytes() == m.raw
    reread = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert [part.get_filename() for part in reread.iter_attachments()] == ["invoice-42.pdf", "lines.csv"]


def test_wait_for_html_attachment_body_and_text_criteria(mta):
    send(mta, reset_mail())
    send(mta, invoice_mail())
    send(mta, utf8_mail())
    assert [m.subject for m in mta.wait_for(count=3)] == [
        "Reset your password", "Invoice 42", "Grüße aus Zürich — €5"]
    assert [m.subject for m in mta.wait_for(html='id="code"')] == ["Reset your password"]
    assert [m.subject for m in mta.wait_for(attachment=".pdf")] == ["Invoice 42"]
    assert [m.subject for m in mta.wait_for(attachment="lines.csv")] == ["Invoice 42"]
    assert [m.subject for m in mta.wait_for(body='<b id="code">')] == ["Reset your password"]  # body: text or HTML
    assert [m.subject for m in mta.wait_for(text="attached")] == ["Invoice 42"]
    with pytest.raises(MTAAssertionError) as failure:
        mta.wait_for(attachment="receipt.pdf", timeout=0.2)
    assert "attachment" in str(failure.value) and "3 message(s) arrived" in str(failure.value)
    with pytest.raises(MTAAssertionError):
        mta.wait_for(html="Zoë", timeout=0.2)  # a text-only message has no HTML


def test_wait_for_exactly(mta):
    send(mta, reset_mail())
    send(mta, reset_mail())
    assert len(mta.wait_for(exactly=2, subject="Reset")) == 2
    with pytest.raises(MTAAssertionError) as too_many:
        mta.wait_for(exactly=1, subject="Reset", timeout=5)
    assert "expected exactly 1 message(s)" in str(too_many.value) and "2 matched" in str(too_many.value)
    with pytest.raises(MTAAssertionError, match="expected exactly 3 message"):
        mta.wait_for(exactly=3, subject="Reset", timeout=0.2)
    send(mta, invoice_mail())
    assert [m.subject for m in mta.wait_for(exactly=1, attachment=".pdf")] == ["Invoice 42"]


async def test_trio_form_has_the_content_criteria():
    async with open_test_mta(smtpd_listen=f"{HOST}:0") as mta:
        await trio.to_thread.run_sync(send, mta, invoice_mail())
        [m] = await mta.wait_for(exactly=1, attachment="invoice-42.pdf")
        assert m.attachments[0].data == PDF


def captured(text: str, page: str | None = None) -> CapturedMessage:
    """A message as the test MTA captures it, without the round trip (2 MB bodies)."""
    message = EmailMessage()
    message["From"] = "app@app.example"
    message["To"] = "ann@example.com"
    message["Subject"] = "big"
    message.set_content(text)
    if page is not None:
        message.add_alternative(page, subtype="html")
    return CapturedMessage("Q1", "app@app.example", ["ann@example.com"], {}, "127.0.0.1", "client.example",
                           "ESMTP", None, "", message.as_bytes())


def cpu_seconds_of(work) -> float:
    start = time.process_time()
    work()
    return time.process_time() - start


def test_links_skip_comments_scripts_fragments_and_an_unfinished_tag():
    page = ('<!-- <a href="https://c.example/commented"> --><link href="/style.css">'
            '<script>var s = "<a href=https://s.example/in-script>";</script>'
            '<A HREF = \'https://app.example/?a=1&amp;b=2\' title="x>y">'
            '<a href="#top"><a href="  "><a data-href="/no" href=/yes>'
            '<a href="https://app.example/unfinished"')
    assert captured("See https://app.example/yes.", page).links == [
        "https://app.example/yes", "/style.css", "https://app.example/?a=1&b=2", "/yes"]


@pytest.mark.parametrize("hostile", ["<a " * 700_000, "<!--" * 500_000, "</" * 1_000_000, "<?" * 1_000_000,
                                     "<a>" * 700_000],
                         ids=["unfinished-tag", "unfinished-comments", "end-tag-openers", "pi-openers", "closed-tags"])
def test_links_of_2_mb_of_hostile_html_cost_well_under_2_cpu_seconds(hostile):
    """html.parser rescanned an unfinished construct at every "<" inside it: "<a " *
    33,000 (100 kB) took 115 s of CPU and "<!--" * 100,000 (400 kB) 106 s."""
    message = captured("no links", hostile)
    assert len(message.html) >= 2_000_000
    assert cpu_seconds_of(lambda: message.links) < 2.0
    assert message.links == []


def test_links_of_an_html_marked_section_html_parser_refused():
    """html.parser raised AssertionError ("expected name token") for "<![" not followed
    by a name: .links failed instead of answering."""
    assert captured("no links", "<![<![ x> <a href=/after>").links == ["/after"]


def test_links_of_2_mb_of_distinct_urls_cost_well_under_2_cpu_seconds():
    """Each URL was checked against a list of those found before: 400 kB of distinct
    URLs took 5 s of CPU (quadratic), 2 MB about two minutes."""
    urls = [f"https://app.example/{i}" for i in range(90_000)]
    message = captured(" ".join(urls), "".join(f'<a href="{url}">' for url in urls[::-1]))
    assert len(message.text) >= 2_000_000
    assert cpu_seconds_of(lambda: message.links) < 2.0
    assert message.links == urls
