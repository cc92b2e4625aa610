"""Acceptance: a Mailpit API client from PyPI (``mailpit-api-client``, its ``API``,
models, ``EMailTestCase`` and pytest fixture) works unchanged against a real
``trimail catch``, making the calls its own examples (its integration tests) make
and checking what they check, with messages of the same kinds (plain text, an
attachment, an inline attachment, both).

``test_the_clients_own_integration_suite`` runs that suite itself, verbatim, when
``MAILPIT_CLIENT_SRC`` names a checkout of github.com/Corvan/mailpit-api-client: it
hard-codes localhost:1025/8025 (and a host called ``mailpit``), so it runs in
private network and mount namespaces (``unshare``, root only) where those are ours.
"""

from __future__ import annotations

import datetime
import email.message
import os
import shutil
import subprocess
import sys
import unittest
from pathlib import Path

import pytest

mailpit_api = pytest.importorskip("mailpit.client.api")
models = pytest.importorskip("mailpit.client.models")

LOREM = "Lorem ipsum dolor sit amet, consectetur adipiscing elit.\nCras non massa lacinia.\n"


def _eml(kind: str) -> email.message.Message:
    """Messages like the client's tests/mail/*.eml (written here, not copied): the
    attachments in base64, so their line ends are their own."""
    msg = email.message.EmailMessage()
    msg["Delivered-To"] = "recipient@example.com"
    msg["Return-Path"] = "<sender@example.com>"
    msg["Date"] = "Wed, 27 Jul 2022 15:44:41 +1200"
    msg["From"] = "Sender Smith <sender@example.com>"
    msg["To"] = "Recipient Ross <recipient@example.com>"
    msg["Subject"] = "Plain text message" if kind == "plain" else f"Message with {kind}"
    msg["Message-ID"] = f"<20220727034441.{kind}@localhost.localhost>"
    msg.set_content(LOREM)
    if kind in ("attachment", "both"):
        msg.add_attachment(b"This is a test attachment\n", maintype="text", subtype="plain",
                           filename="attachment.txt", disposition="attachment")
    if kind in ("inline", "both"):
        msg.add_attachment(b"This is an inline attachment\n" if kind == "both" else b"This is a test attachment\n",
                           maintype="text", subtype="plain",
                           filename="attachment_inline.txt" if kind == "both" else "attachment.txt",
                           disposition="inline")
    return msg


@pytest.fixture
def mailpit(catch):
    c = catch()
    return c, mailpit_api.API(c.base)


def _send(c, kind: str) -> str:
    c.send(_eml(kind), "Sender Smith <sender@example.com>", ["Recipient Ross <recipient@example.com>"])
    c.wait_for(1)
    return mailpit_api.API(c.base).get_messages().messages[0].id


def test_messages_endpoint_empty_then_one_message_as_the_clients_models_expect(mailpit):
    c, api = mailpit
    assert len(api.get_messages().messages) == 0
    _send(c, "plain")
    messages = api.get_messages()
    expected = models.Messages(total=1, count=1, unread=1, start=0, messages=[models.MessageSummary(
        id=messages.messages[0].id, message_id="20220727034441.plain@localhost.localhost",
        created=messages.messages[0].created, size=messages.messages[0].size,
        from_=models.Contact(name="Sender Smith", address="sender@example.com"),
        to=[models.Contact(name="Recipient Ross", address="recipient@example.com")],
        cc=[], bcc=[], read=False, subject="Plain text message", attachments=0)])
    assert messages == expected
    assert abs(messages.messages[0].created - datetime.datetime.now(datetime.UTC)) < datetime.timedelta(minutes=1)


def test_get_message_fields(mailpit):
    c, api = mailpit
    message = api.get_message(_send(c, "plain"))
    assert message.subject == "Plain text message"
    assert message.message_id == "20220727034441.plain@localhost.localhost"
    assert message.from_.name == "Sender Smith" and message.from_.address == "sender@example.com"
    assert [(t.name, t.address) for t in message.to] == [("Recipient Ross", "recipient@example.com")]
    assert len(message.cc) == 0 and len(message.bcc) == 0 and len(message.inline) == 0
    assert message.date == datetime.datetime.fromisoformat("2022-07-27 15:44:41.000000+12:00")
    assert message.read is True
    assert message.text == LOREM.replace("\n", "\r\n")
    assert message.html == ""
    assert message.size == len(c.request("GET", f"/api/v1/message/{message.id}/raw")[2])


@pytest.mark.parametrize(("kind", "attachments", "inline"), [
    ("plain", [], []),
    ("attachment", [("2", "attachment.txt", 26)], []),
    ("inline", [], [("2", "attachment.txt", 26)]),
    ("both", [("2", "attachment.txt", 26)], [("3", "attachment_inline.txt", 29)]),
])
def test_attachments_and_inline_attachments(mailpit, kind, attachments, inline):
    c, api = mailpit
    message_id = _send(c, kind)
    message = api.get_message(message_id)
    assert [(a.part_id, a.file_name, a.size) for a in message.attachments] == attachments
    assert [(a.part_id, a.file_name, a.size) for a in message.inline] == inline
    for part in message.attachments + message.inline:
        assert part.content_type == "text/plain" and part.content_id == ""
    if attachments:
        assert api.get_message_attachment(message_id, "2") == "This is a test attachment\n"
    if kind == "both":
        assert api.get_message_attachment(message_id, "3") == "This is an inline attachment\n"


def test_get_headers(mailpit):
    c, api = mailpit
    headers = api.get_message_headers(_send(c, "plain"))
    assert headers.content_type[0] == 'text/plain; charset="utf-8"'
    assert headers.date[0] == datetime.datetime(2022, 7, 27, 15, 44, 41,
                                                tzinfo=datetime.timezone(datetime.timedelta(hours=12)))
    assert headers.delivered_to[0] == "recipient@example.com"
    assert headers.from_[0] == "Sender Smith <sender@example.com>"
    assert headers.message_id[0] == "<20220727034441.plain@localhost.localhost>"
    del headers.additional["Received"]  # trimail's own, with the time in it
    assert headers.additional == {
        "Content-Transfer-Encoding": ["7bit"], "Mime-Version": ["1.0"],
        "Return-Path": ["<sender@example.com>"], "Subject": ["Plain text message"],
        "To": ["Recipient Ross <recipient@example.com>"]}


def test_delete_and_put_as_the_client_sends_them(mailpit):
    c, api = mailpit
    _send(c, "plain")
    # the client sends form data, not JSON: Mailpit then marks nothing (400) and deletes everything
    with pytest.raises(Exception):  # noqa: B017 - httpx.HTTPStatusError, as against Mailpit
        api.put_messages([api.get_messages().messages[0].id], "Read", True)
    assert api.last_response.status_code == 400
    api.delete_messages([m.id for m in api.get_messages().messages])
    assert api.get_messages().total == 0


def test_the_unittest_helper(catch):
    c = catch()
    from mailpit.testing.unittest import EMailTestCase

    class Received(EMailTestCase):
        api_url = c.base

        def test_received(self):
            c.send(_eml("plain"), "sender@example.com", ["recipient@example.com"])
            c.wait_for(1)
            self.assertMessageReceived("20220727034441.plain@localhost.localhost")
            with self.assertRaises(AssertionError):
                self.assertMessageReceived("test@testing.org")
            self.mailpit_api.delete_messages([])

    result = unittest.TestResult()
    unittest.TestLoader().loadTestsFromTestCase(Received).run(result)
    assert result.wasSuccessful(), result.failures + result.errors
    assert c.json("/api/v1/messages")["total"] == 0


def test_the_pytest_fixture(catch, tmp_path):
    c = catch()
    c.send(_eml("plain"), "sender@example.com", ["recipient@example.com"])
    c.wait_for(1)
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["mailpit.testing.pytest"]\n')
    (tmp_path / "test_client.py").write_text(f"""
import pytest

@pytest.mark.parametrize("mailpit_api", ["{c.base}"], indirect=True)
def test_api(mailpit_api):
    assert len(mailpit_api.get_messages().messages) == 1
""")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:trimail",
                           "-o", "addopts=", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stdout[-3000:]
    # the fixture's teardown deletes what the session left
    assert c.json("/api/v1/messages")["total"] == 0


def test_the_clients_own_integration_suite(tmp_path):
    source = os.environ.get("MAILPIT_CLIENT_SRC")
    if not source or not (Path(source) / "tests" / "integration").is_dir():
        pytest.skip("set MAILPIT_CLIENT_SRC to a checkout of Corvan/mailpit-api-client")
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare for private namespaces")
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost mailpit\n")
    # Mailpit's own SMTP banner and HELO texts are checked too: not the API, and not ours
    deselect = "not test_smtp_connect__response_message and not test_helo__response_message " \
               "and not test_ehlo__response_message"
    script = f"""
set -e
mount --bind {hosts} /etc/hosts
ip link set lo up
{sys.executable} -m trimail catch --smtp 127.0.0.1:1025 --listen 127.0.0.1:8025 > {tmp_path}/out 2>&1 &
catcher=$!
for i in $(seq 300); do grep -q http {tmp_path}/out && break; sleep 0.1; done
cd {source}
status=0
HOME={tmp_path} {sys.executable} -m pytest -q -p no:cacheprovider -p no:trimail -o addopts= tests/integration \
    -k "{deselect}" || status=$?
kill $catcher
wait $catcher || true
exit $status
"""
    done = subprocess.run(["unshare", "--net", "--mount", "sh", "-c", script], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ), check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
