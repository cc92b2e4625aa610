"""Any bytes a client can get accepted become a message the API can list, show and
search: the Mailpit view (mime.py) and the JSON built from it never raise."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trimail.catch.api import Api, Request, message_json
from trimail.catch.chaos import Chaos
from trimail.catch.mime import MessageView
from trimail.catch.page import body_html
from trimail.catch.page import message as message_page
from trimail.catch.store import Mailbox, Stored

PIECES = [b"Content-Type: multipart/mixed; boundary=b\r\n", b"Content-Type: multipart/alternative; boundary=b\r\n",
          b"--b\r\n", b"--b--\r\n", b"\r\n", b"Content-Type: text/html; charset=bogus\r\n",
          b"Content-Transfer-Encoding: base64\r\n", b"Content-Transfer-Encoding: quoted-printable\r\n",
          b"Content-Disposition: attachment; filename*=utf-8''%ff%fe\r\n", b"Content-ID: <x>\r\n",
          b"From: =?utf-8?b?////?= <a@b>\r\n", b"To: \"unterminated <x@y>, ;;, @@\r\n", b"Date: Mon, 99 Foo 2022\r\n",
          b"Subject: =?x-unknown?q?=FF?=\r\n", b" folded continuation\r\n", b"<p>html<img src=cid:x>",
          b"Content-Type: message/rfc822\r\n", b"Content-Type: text/plain; name=\"a\r\n b\"\r\n", b"\xff\xfe\x00",
          b"=?utf-8?q?=E2=82?=", b"Content-Type: /\r\n", b"Content-Type: text/plain; charset=\"\"\r\n"]


def _check(raw: bytes) -> None:
    view = MessageView(raw)
    stored = Stored("A" * 22, datetime.now(UTC), view)
    json.dumps(stored.summary())
    json.dumps(message_json(stored))
    json.dumps(view.headers())
    message_page(stored)
    body_html(stored)
    for part in view.listed()[0] + view.listed()[1]:
        assert view.part(part.part_id) is part
    mailbox = Mailbox()
    mailbox.add(raw, sender="a@example.org", recipients=["b@example.com"])
    api = Api(mailbox, Chaos(True))
    for query in ("to:b", "hello", "has:attachment", "-is:read", "larger:1k", "after:2022-01-01"):
        assert api.answer(Request("GET", "/api/v1/search", {"query": [query]})).status == 200
    assert api.answer(Request("GET", "/api/v1/messages", {})).status == 200


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.sampled_from(PIECES), st.binary(max_size=40)), max_size=30))
def test_any_message_can_be_listed_shown_and_searched(pieces):
    _check(b"".join(pieces))
