"""Mailpit's API v1 on a real ``trimail catch``: the calls test clients make, with
Mailpit's JSON field names, over real SMTP and HTTP."""

from __future__ import annotations

import json
import os
import smtplib
import socket
import subprocess
import sys

import pytest

from tests.catch.conftest import message


def test_an_empty_mailbox_lists_no_messages_in_mailpits_shape(catch):
    listed = catch().json("/api/v1/messages")
    assert listed == {"total": 0, "unread": 0, "count": 0, "messages_count": 0, "messages_unread": 0,
                      "start": 0, "tags": [], "messages": []}


def test_messages_are_listed_newest_first_with_start_and_limit(catch):
    c = catch()
    for n in range(3):
        c.send(message(f"number {n}"))
    c.wait_for(3)
    listed = c.json("/api/v1/messages?start=1&limit=1")
    assert (listed["total"], listed["unread"], listed["count"], listed["start"]) == (3, 3, 1, 1)
    [summary] = listed["messages"]
    assert summary["Subject"] == "number 1"
    assert summary["From"] == {"Name": "Alice", "Address": "alice@example.org"}
    assert summary["To"] == [{"Name": "Bob", "Address": "bob@example.com"}]
    assert summary["Cc"] == [] and summary["Bcc"] == [] and summary["Read"] is False
    assert summary["MessageID"] == "number.1@example.org"
    assert len(summary["ID"]) == 22 and summary["Created"].endswith("Z")
    assert [m["Subject"] for m in c.json("/api/v1/messages")["messages"]] == ["number 2", "number 1", "number 0"]


def test_one_message_has_text_html_attachments_and_is_then_read(catch):
    c = catch()
    c.send(message("With parts", text="Your code is 123456\n", html="<p>Reset: <a href='https://x.test/r'>here</a></p>",
                   attachments=[("report.pdf", "application/pdf", b"%PDF-1.4 data")]))
    [summary] = c.wait_for(1)
    got = c.json(f"/api/v1/message/{summary['ID']}")
    assert got["Text"] == "Your code is 123456\r\n"  # Mailpit keeps the message's own line ends
    assert "href='https://x.test/r'" in got["HTML"]
    assert got["Subject"] == "With parts" and got["MessageID"] == "With.parts@example.org"
    assert got["Date"] == "2022-07-27T15:44:41+12:00"
    assert got["ReturnPath"] == "alice@example.org"
    [attachment] = got["Attachments"]
    assert attachment["FileName"] == "report.pdf" and attachment["ContentType"] == "application/pdf"
    assert attachment["PartID"] == "2" and attachment["Size"] == len(b"%PDF-1.4 data")
    assert got["Inline"] == []
    status, headers, data = c.request("GET", f"/api/v1/message/{summary['ID']}/part/2")
    assert (status, data) == (200, b"%PDF-1.4 data")
    assert headers["Content-Type"] == "application/pdf"
    listed = c.json("/api/v1/messages")
    assert listed["unread"] == 0 and listed["messages"][0]["Read"] is True


def test_latest_headers_and_raw_source(catch):
    c = catch()
    c.send(message("first"))
    c.send(message("second"))
    c.wait_for(2)
    assert c.json("/api/v1/message/latest")["Subject"] == "second"
    assert c.json("/api/v1/message/latest?query=subject:first")["Subject"] == "first"
    headers = c.json("/api/v1/message/latest/headers")
    assert headers["Subject"] == ["second"] and headers["Message-Id"] == ["<second@example.org>"]
    assert headers["Return-Path"] == ["<alice@example.org>"] and "Received" in headers
    status, response_headers, raw = c.request("GET", "/api/v1/message/latest/raw?dl=1")
    assert status == 200 and b"\r\nSubject: second\r\n" in raw
    assert response_headers["Content-Disposition"].startswith("attachment; filename=")


def test_recipients_in_no_header_are_shown_in_bcc(catch):
    c = catch()
    c.send(message("blind"), recipients=["bob@example.com", "hidden@example.net"])
    [summary] = c.wait_for(1)
    assert summary["Bcc"] == [{"Name": "", "Address": "hidden@example.net"}]


@pytest.mark.parametrize(("query", "subjects"), [
    ("to:carol", ["to carol"]),
    ("from:alice", ["to carol", "to bob"]),
    ("subject:carol", ["to carol"]),
    ("-to:carol", ["to bob"]),
    ("invoice", ["to bob"]),
    ('"to bob"', ["to bob"]),
    ("is:unread to:bob", ["to bob"]),
    ("has:attachment", []),
])
def test_search_with_mailpits_filters(shared_catch, query, subjects):
    c = shared_catch
    if c.json("/api/v1/messages")["total"] != 2:
        c.request("DELETE", "/api/v1/messages")
        c.send(message("to bob", text="your invoice\n"))
        c.send(message("to carol", to="Carol <carol@example.com>"), recipients=["carol@example.com"])
        c.wait_for(2)
    found = c.json("/api/v1/search?query=" + query.replace(" ", "%20").replace('"', "%22"))
    assert [m["Subject"] for m in found["messages"]] == subjects
    assert found["messages_count"] == len(subjects) and found["total"] == 2


def test_search_without_a_query_is_mailpits_400(catch):
    status, _, body = catch().request("GET", "/api/v1/search?query=")
    assert (status, body) == (400, b"Error: no search query")


def test_delete_some_then_all(catch):
    c = catch()
    for n in range(3):
        c.send(message(f"m{n}"))
    ids = [m["ID"] for m in c.wait_for(3)]
    assert c.request("DELETE", "/api/v1/messages", json.dumps({"IDs": ids[:1]}).encode())[0] == 200
    assert [m["ID"] for m in c.json("/api/v1/messages")["messages"]] == ids[1:]
    assert c.request("DELETE", "/api/v1/messages")[:1] == (200,)
    assert c.json("/api/v1/messages")["total"] == 0
    assert c.request("GET", f"/api/v1/message/{ids[1]}")[0] == 404


def test_mark_read_and_unread(catch):
    c = catch()
    c.send(message("a"))
    c.send(message("b"))
    ids = [m["ID"] for m in c.wait_for(2)]
    assert c.request("PUT", "/api/v1/messages", json.dumps({"IDs": ids[:1], "Read": True}).encode())[0] == 200
    assert c.json("/api/v1/messages")["unread"] == 1
    c.request("PUT", "/api/v1/messages", json.dumps({"Read": True}).encode())
    assert c.json("/api/v1/messages")["unread"] == 0
    c.request("PUT", "/api/v1/messages", json.dumps({"read": False, "search": "subject:a"}).encode())
    assert [m["Subject"] for m in c.json("/api/v1/search?query=is:unread")["messages"]] == ["a"]
    assert c.request("PUT", "/api/v1/messages", b"ids=x")[0] == 400  # form data, not JSON: Mailpit's 400


def test_max_keeps_the_newest_messages(catch):
    c = catch("--max", "2")
    for n in range(4):
        c.send(message(f"n{n}"))
    deadline_list = c.wait_for(2)
    assert len(deadline_list) == 2
    info = c.json("/api/v1/info")
    assert info["RuntimeStats"]["SMTPAccepted"] == 4
    assert [m["Subject"] for m in c.json("/api/v1/messages")["messages"]] == ["n3", "n2"]
    assert info["Messages"] == 2 and info["RuntimeStats"]["MessagesDeleted"] == 2


def test_info_and_webui(catch):
    c = catch()
    info = c.json("/api/v1/info")
    assert {"Version", "LatestVersion", "Database", "DatabaseSize", "Messages", "Unread", "Tags",
            "RuntimeStats"} <= set(info)
    webui = c.json("/api/v1/webui")
    assert webui["ChaosEnabled"] is False and webui["MessageRelay"]["Enabled"] is False
    assert c.json("/api/v1/tags") == []


def test_unknown_ids_paths_and_methods(catch):
    c = catch()
    status, _, body = c.request("GET", "/api/v1/message/AAAAAAAAAAAAAAAAAAAAAA")
    assert (status, body) == (404, b"404 page not found")
    assert c.request("GET", "/api/v1/message/latest")[2] == b"Message not found"
    assert c.request("GET", "/api/v2/nothing")[0] == 404
    status, headers, _ = c.request("POST", "/api/v1/messages", b"{}")
    assert status == 405 and "GET" in headers["Allow"]


def test_chaos_is_refused_unless_enabled(catch):
    status, _, body = catch().request("GET", "/api/v1/chaos")
    assert (status, body) == (400, b"Chaos is not enabled")


def test_chaos_triggers_refuse_mail_from_and_rcpt_to(catch):
    c = catch("--enable-chaos")
    assert c.json("/api/v1/chaos") == {"Sender": {"ErrorCode": 451, "Probability": 0},
                                       "Recipient": {"ErrorCode": 451, "Probability": 0},
                                       "Authentication": {"ErrorCode": 535, "Probability": 0}}
    got = c.json("/api/v1/chaos", "PUT", {"Sender": {"ErrorCode": 452, "Probability": 100}})
    assert got["Sender"] == {"ErrorCode": 452, "Probability": 100}
    with pytest.raises(smtplib.SMTPSenderRefused) as refused:
        c.send(message("refused"))
    assert refused.value.smtp_code == 452 and b"Chaos sender error" in refused.value.smtp_error
    c.json("/api/v1/chaos", "PUT", {"Recipient": {"ErrorCode": 550, "Probability": 100}})
    with pytest.raises(smtplib.SMTPRecipientsRefused) as rejected:
        c.send(message("rejected"))
    assert rejected.value.recipients["bob@example.com"][0] == 550
    c.json("/api/v1/chaos", "PUT", {})
    c.send(message("accepted"))
    assert [m["Subject"] for m in c.wait_for(1)] == ["accepted"]
    assert c.json("/api/v1/info")["RuntimeStats"]["SMTPRejected"] == 2
    assert c.json("/api/v1/webui")["ChaosEnabled"] is True


@pytest.mark.parametrize("body", [{"Sender": {"ErrorCode": 300, "Probability": 1}},
                                  {"Recipient": {"ErrorCode": 451, "Probability": 101}}])
def test_chaos_out_of_bounds_is_400_and_changes_nothing(catch, body):
    c = catch("--enable-chaos")
    status, _, text = c.request("PUT", "/api/v1/chaos", json.dumps(body).encode())
    assert status == 400 and b"must be between" in text
    assert c.json("/api/v1/chaos")["Sender"]["Probability"] == 0


@pytest.mark.parametrize("which", ["--smtp", "--listen"])
def test_a_port_in_use_is_one_line_and_status_1(which):
    with socket.socket() as busy:
        busy.bind(("127.0.44.254", 0))
        busy.listen()
        taken = f"127.0.44.254:{busy.getsockname()[1]}"
        other = "--listen" if which == "--smtp" else "--smtp"
        done = subprocess.run([sys.executable, "-m", "trimail", "catch", which, taken, other, "127.0.44.254:0"],
                              capture_output=True, text=True, timeout=60, env=dict(os.environ), check=False)
    assert done.returncode == 1
    assert done.stderr.strip() == f"trimail: fatal: cannot listen on {taken}: Address already in use"


def test_a_malformed_address_is_refused():
    done = subprocess.run([sys.executable, "-m", "trimail", "catch", "--smtp", "nonsense"], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ), check=False)
    assert done.returncode == 1 and "--smtp: expected HOST:PORT" in done.stderr


def test_mailpits_testing_views_give_the_html_and_the_text_alone(catch):
    c = catch()
    msg = message("with image", text="the text\n", html="<p>logo: <img src=\"cid:logo@x\"></p>")
    msg.get_payload()[1].add_related(b"\x89PNG-ish", maintype="image", subtype="png", cid="<logo@x>")
    c.send(msg)
    [summary] = c.wait_for(1)
    status, headers, html = c.request("GET", f"/view/{summary['ID']}.html")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    [inline] = c.json(f"/api/v1/message/{summary['ID']}")["Inline"]
    assert f'<img src="/api/v1/message/{summary["ID"]}/part/{inline["PartID"]}">'.encode() in html
    assert c.request("GET", "/view/latest.txt")[2] == b"the text\r\n"
    c.send(message("text only"))
    c.wait_for(2)
    assert c.request("GET", "/view/latest.html")[:3:2] == (404, b"This message does not contain a HTML part")
    assert c.request("GET", "/view/AAAAAAAAAAAAAAAAAAAAAA.txt")[:3:2] == (404, b"Message not found")
