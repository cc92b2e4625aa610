"""Red team (session 20) against a real ``trimail catch``: messages whose MIME tree
is deeper than Python's stack or has tens of thousands of parts, request smuggling
with two Content-Length fields, a size filter that overflows a float.  Each once cost
every later list, page or search a 500, or made one message's JSON unbounded."""

from __future__ import annotations

import json
import socket
import time

import pytest

from tests.catch.conftest import Catch, message


@pytest.fixture
def c():
    catch = Catch(host="127.0.62.20")
    yield catch
    assert catch.alive()
    catch.stop()


def _deep(levels: int) -> bytes:
    out = b"From: a@example.org\r\nSubject: deep\r\nMessage-ID: <deep@example.org>\r\n"
    for n in range(levels):
        out += b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (n, n)
    out += b"Content-Type: text/plain\r\n\r\nhi\r\n"
    for n in reversed(range(levels)):
        out += b"--b%d--\r\n" % n
    return out


def _nested_rfc822(levels: int) -> bytes:
    return (b"From: a@example.org\r\nSubject: russian doll\r\n" + b"Content-Type: message/rfc822\r\n\r\n" * levels
            + b"Content-Type: text/plain\r\n\r\nhi\r\n")


def _wide(parts: int) -> bytes:
    part = (b'--x\r\nContent-Type: application/octet-stream\r\n'
            b'Content-Disposition: attachment; filename="a.bin"\r\n\r\nA\r\n')
    return (b'From: a@example.org\r\nSubject: wide\r\nContent-Type: multipart/mixed; boundary="x"\r\n\r\n'
            + part * parts + b"--x--\r\n")


@pytest.mark.parametrize("raw", [_deep(2000), _nested_rfc822(5000)], ids=["multipart", "message-rfc822"])
def test_a_message_nested_deeper_than_the_stack_does_not_break_the_list(c, raw):
    c.send(message("before"))
    c.send(raw)
    listed = c.wait_for(2)
    assert len(listed) == 2
    for path in ("/api/v1/messages", "/", "/api/v1/search?query=before", f"/api/v1/message/{listed[0]['ID']}",
                 f"/view/{listed[0]['ID']}", f"/api/v1/message/{listed[1]['ID']}"):
        status, _, body = c.request("GET", path)
        assert status == 200, (path, body[:200])
    assert [m["Subject"] for m in c.json("/api/v1/search?query=before")["messages"]] == ["before"]


def test_a_message_with_twenty_thousand_parts_gets_a_bounded_answer(c):
    c.send(_wide(20_000))
    (listed,) = c.wait_for(1)
    status, _, body = c.request("GET", f"/api/v1/message/{listed['ID']}")
    assert status == 200
    assert len(json.loads(body)["Attachments"]) <= 1000
    assert len(body) < 1_000_000  # unbounded: 20,000 attachment objects, about 6 MB
    assert c.json("/api/v1/messages")["messages"][0]["Attachments"] <= 1000



@pytest.mark.parametrize("request_bytes", [
    b"PUT /api/v1/messages HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 11\r\n\r\n{\"IDs\":[1]}",
    b"GET /livez HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 0\r\n\r\n",
    b"PUT /api/v1/messages HTTP/1.1\r\nContent-Length: +11\r\n\r\n{\"IDs\":[1]}",
    b"PUT /api/v1/messages HTTP/1.1\r\nContent-Length: 1_1\r\n\r\n{\"IDs\":[1]}",
    b"GET /livez HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
])
def test_ambiguous_framing_is_refused_not_guessed(c, request_bytes):
    """RFC 9112 6.3: two Content-Length fields (or one int() reads but HTTP does
    not) are a smuggling attempt behind a proxy: 400, never a guess."""
    assert c.raw(request_bytes).startswith(b"HTTP/1.1 400 ")


def test_a_size_filter_too_big_for_a_float_is_no_error(c):
    c.send(message("small"))
    c.wait_for(1)
    found = c.json("/api/v1/search?query=larger:" + "9" * 400)
    assert found["messages_count"] == 0
    assert c.json("/api/v1/search?query=smaller:" + "9" * 400)["messages_count"] == 1


def _timed_get(c: Catch, path: str, within: float) -> bytes:
    """GET *path*; the whole answer must come within *within* seconds (the catcher
    has one thread: a slow answer is a stalled catcher, SMTP included)."""
    started = time.monotonic()
    with socket.create_connection((c.host, c.http_port), timeout=within) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\n\r\n".encode())
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert time.monotonic() - started < within, path
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    return answer


HOSTILE = {
    # HTMLParser rescans to the end at each "<" it cannot close: 200 KB of "<a" was minutes
    "html-unclosed-tags": b"Subject: h\r\nContent-Type: text/html\r\n\r\n" + b"<a" * 100_000,
    "html-end-tags": b"Subject: h\r\nContent-Type: text/html\r\n\r\n" + b"</" * 200_000,
    # (top-level fields are bounded by header_size_limit; a MIME part's are not)
    # email.header.decode_header pops from the front of a list: quadratic in the words
    "encoded-words": (b'Subject: w\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
                      b"Content-Type: application/pdf\r\nContent-Disposition: attachment;\r\n filename=\""
                      + b"=?utf-8?q?a?= " * 100_000 + b'"\r\n\r\nx\r\n--b--\r\n'),
    # email.message._parseparam slices the field at each ";": quadratic in the parameters
    "parameters": (b'Subject: p\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
                   b"Content-Type: text/plain; " + b"; ".join(b"p%d=v" % n for n in range(200_000))
                   + b"\r\n\r\nx\r\n--b--\r\n"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_message_does_not_stall_the_catcher(c, name):
    c.send(message("before"))
    c.send(b"From: a@example.org\r\n" + HOSTILE[name])
    deadline = time.monotonic() + 10
    while len(json.loads(_timed_get(c, "/api/v1/messages", 5).split(b"\r\n\r\n", 1)[1])["messages"]) < 2:
        assert time.monotonic() < deadline
    listed = json.loads(_timed_get(c, "/api/v1/messages", 3).split(b"\r\n\r\n", 1)[1])["messages"]
    for path in (f"/api/v1/message/{listed[0]['ID']}", f"/view/{listed[0]['ID']}", "/", "/api/v1/search?query=zzz",
                 "/api/v1/messages", "/api/v1/messages"):
        _timed_get(c, path, 3)
    c.send(message("after"))  # SMTP too
    assert c.wait_for(3)[0]["Subject"] == "after"
