"""Red team (session 34) against a real ``trimail catch``: a UTF-7 body, subject,
file name or Content-ID that decodes to a lone surrogate cost every list, search
and the message itself a 500 (JSON cannot encode it); a date without a zone in
``after:``/``before:`` cost the search a 500; an infinite chaos value a 500."""

from __future__ import annotations

import json
import urllib.parse

import pytest

from tests.catch.conftest import Catch


@pytest.fixture
def c():
    catch = Catch("--enable-chaos", host="127.0.34.151")
    yield catch
    assert catch.alive()
    catch.stop()


SURROGATES = [
    b"Subject: body\r\nContent-Type: text/plain; charset=utf-7\r\n\r\nhi +2AA-\r\n",
    b"Subject: =?utf-7?q?+2AA-?=\r\n\r\nhi\r\n",
    b'Subject: name\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n\r\nhi\r\n'
    b"--b\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename*=utf-7''a+2AA-.pdf\r\n\r\n"
    b"%PDF\r\n--b--\r\n",
    b'Subject: cid\r\nContent-Type: multipart/related; boundary="b"\r\n\r\n--b\r\nContent-Type: text/html\r\n\r\n'
    b'<img src="cid:\x80">\r\n--b\r\nContent-Type: image/png\r\nContent-ID: <\x80>\r\n\r\nPNG\r\n--b--\r\n',
]


@pytest.mark.parametrize("raw", SURROGATES, ids=["utf7-body", "utf7-subject", "utf7-filename", "8bit-content-id"])
def test_a_lone_surrogate_in_one_message_does_not_break_the_api(c, raw):
    c.send(raw)
    [listed] = c.wait_for(1)
    ident = listed["ID"]
    paths = ["/api/v1/messages", "/api/v1/search?query=hi", f"/api/v1/message/{ident}", f"/view/{ident}",
             f"/view/{ident}.txt", "/", f"/api/v1/message/{ident}/headers"]
    for part in c.json(f"/api/v1/message/{ident}")["Attachments"] + c.json(f"/api/v1/message/{ident}")["Inline"]:
        paths.append(f"/api/v1/message/{ident}/part/{part['PartID']}")
    for path in paths:
        status, _, body = c.request("GET", path)
        assert status == 200, (path, body[:200])
        body.decode("utf-8")


@pytest.mark.parametrize("query", ['after:"1 Jan 2024 00:00:00 -0000"', 'before:"Mon, 1 Jan 2024 00:00:00"'])
def test_a_date_without_a_zone_in_a_search_is_read_as_utc(c, query):
    c.send(b"Subject: dated\r\n\r\nx\r\n")
    c.wait_for(1)
    status, _, body = c.request("GET", "/api/v1/search?query=" + urllib.parse.quote(query))
    assert status == 200, body
    assert json.loads(body)["messages_count"] == (1 if query.startswith("after") else 0)
    status, _, _ = c.request("GET", "/?query=" + urllib.parse.quote(query))
    assert status == 200


@pytest.mark.parametrize("body", [b'{"Sender": {"ErrorCode": 1e400, "Probability": 100}}',
                                  b'{"Recipient": {"ErrorCode": 451, "Probability": -Infinity}}'])
def test_an_infinite_chaos_value_is_a_400_and_changes_nothing(c, body):
    status, _, answer = c.request("PUT", "/api/v1/chaos", body)
    assert status == 400, answer
    assert c.json("/api/v1/chaos")["Sender"]["Probability"] == 0


def test_a_query_of_thousands_of_terms_is_refused_not_run(c):
    import smtplib
    import time

    with smtplib.SMTP(c.host, c.smtp_port, timeout=30) as client:
        for n in range(200):
            client.sendmail("a@example.org", ["b@example.com"], f"Subject: apples {n}\r\n\r\napples\r\n")
    assert len(c.json("/api/v1/messages?limit=500")["messages"]) == 200
    many = urllib.parse.quote_plus(" ".join(f"-x{n}" for n in range(1500)))  # every term excludes nothing: all pass
    for method, path in [("GET", "/api/v1/search?query="), ("DELETE", "/api/v1/search?query="), ("GET", "/?query="),
                         ("GET", "/api/v1/message/latest?query=")]:
        started = time.monotonic()
        status, _, body = c.request(method, path + many)
        assert (status, body) == (400, b"Error: too many search terms (1500, at most 50)"), (path, status, body[:100])
        assert time.monotonic() - started < 5
    assert c.json("/api/v1/messages")["total"] == 200
    fifty = urllib.parse.quote("apples " + " ".join(f"-x{n}" for n in range(49)))
    assert c.json("/api/v1/search?query=" + fifty)["messages_count"] == 200


def test_the_html_view_of_a_big_message_with_many_inline_parts_is_quick(c):
    import time

    html = "<p>" + "x=" * 1_500_000 + '</p><img src="cid:i5@x"><img src=CID:I7@X/>'
    parts = "".join(f"--b\r\nContent-Type: image/png\r\nContent-ID: <i{n}@x>\r\n\r\nP\r\n" for n in range(999))
    c.send(('Subject: cids\r\nContent-Type: multipart/related; boundary="b"\r\n\r\n--b\r\n'
            f"Content-Type: text/html\r\n\r\n{html}\r\n{parts}--b--\r\n").encode())
    [listed] = c.wait_for(1, timeout=30)
    started = time.monotonic()
    status, _, body = c.request("GET", f"/view/{listed['ID']}.html")
    assert status == 200 and time.monotonic() - started < 10
    assert body.endswith(f'<img src="/api/v1/message/{listed["ID"]}/part/7">'
                         f'<img src=/api/v1/message/{listed["ID"]}/part/9/>'.encode())


def test_a_request_with_lf_line_ends_is_answered_at_once(c):
    import socket

    for request, status in [(b"GET /livez HTTP/1.0\n\n", b"200"), (b"GET /api/v1/messages HTTP/1.1\nHost: x\n\n", b"200"),
                            (b"GET /livez HTTP/1.1\r\nHost: x\n\r\n", b"200"), (b"GET /livez HTTP/1.1\nX: a\rb\n\n", b"400")]:
        with socket.create_connection((c.host, c.http_port), timeout=5) as s:  # no shutdown: the server must see the end
            s.sendall(request)
            answer = b""
            while b"\r\n\r\n" not in answer and (chunk := s.recv(65536)):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 " + status), (request, answer[:80])


def test_an_o_value_of_two_lines_cannot_add_parameters():
    import subprocess
    import sys

    catch = subprocess.Popen([sys.executable, "-m", "trimail", "catch", "-o",
                              "bounce_size_limit=50000\ndefault_transport = smtp", "--smtp", "127.0.34.153:0",
                              "--listen", "127.0.34.153:0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = catch.communicate(timeout=30)
    except subprocess.TimeoutExpired:  # it started, delivering with smtp
        catch.kill()
        catch.communicate()
        raise AssertionError("trimail catch started with a default_transport of the -o value's second line") from None
    assert catch.returncode == 1 and "-o bounce_size_limit: a value is one line" in stderr, stderr[-500:]


def test_o_cannot_open_a_reinjection_listener():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "trimail", "catch", "-o", "reinject_listen=127.0.34.153:0",
                           "--smtp", "127.0.34.153:0", "--listen", "127.0.34.153:0"], capture_output=True, text=True,
                          timeout=20, check=False)
    assert done.returncode == 1 and "-o reinject_listen: set by trimail catch itself" in done.stderr
