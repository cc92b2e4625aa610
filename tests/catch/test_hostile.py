"""Hostile HTTP and mail against ``trimail catch``: malformed requests, huge header
fields, slow clients, path tricks in IDs, resets, broken MIME.  None may end the
process or leak a file; each gets a 4xx (or is dropped) and the API keeps working."""

from __future__ import annotations

import socket
import time

import pytest

from tests.catch.conftest import message


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


@pytest.fixture(scope="module")
def c(shared_catch):
    shared_catch.send(message("still here"))
    shared_catch.wait_for(1)
    yield shared_catch
    assert shared_catch.alive()
    assert shared_catch.json("/api/v1/messages")["messages"][0]["Subject"] == "still here"


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"GARBAGE\r\n\r\n", 400),
    (b"\x00\xff\xfe junk\r\n\r\n", 400),
    (b"GET /api/v1/messages\r\n\r\n", 400),
    (b"GET api/v1/messages HTTP/1.1\r\n\r\n", 400),
    (b"GET /api/v1/messages SPDY/3\r\n\r\n", 400),
    (b"BREW /pot HTTP/1.1\r\n\r\n", 405),
    (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n folded: x\r\n\r\n", 400),
    (b"PUT /api/v1/chaos HTTP/1.1\r\nContent-Length: -5\r\n\r\n", 400),
    (b"PUT /api/v1/chaos HTTP/1.1\r\nContent-Length: banana\r\n\r\n", 400),
    (b"PUT /api/v1/chaos HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n", 413),
    (b"PUT /api/v1/chaos HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 411),
    (b"PUT /api/v1/messages HTTP/1.1\r\nContent-Length: 7\r\n\r\n{\"IDs\":", 400),
    (b"GET /api/v1/search?" + b"&".join(b"a=%d" % n for n in range(500)) + b" HTTP/1.1\r\n\r\n", 400),
    (b"GET /api/v1/search?query=%ff%fe%00 HTTP/1.1\r\n\r\n", 200),
])
def test_malformed_requests_get_a_4xx_and_the_catcher_goes_on(c, request_bytes, status):
    assert _status(c.raw(request_bytes)) == status
    assert c.alive()


def test_huge_header_fields_get_431(c):
    answer = c.raw(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n")
    assert _status(answer) == 431
    assert _status(c.raw(b"GET / HTTP/1.1\r\n" + b"X-Many: 1\r\n" * 5000 + b"\r\n")) == 431


@pytest.mark.parametrize("path", [
    "/api/v1/message/../../../../etc/passwd",
    "/api/v1/message/..%2F..%2F..%2Fetc%2Fpasswd/raw",
    "/api/v1/message/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/api/v1/message/latest/part/..%2F..%2F..%2Fetc%2Fpasswd",
    "/api/v1/message/latest/part/%00",
    "/view/..%2F..%2Fetc%2Fpasswd.html",
    "/view/%00",
    "//etc/passwd",
    "/etc/passwd",
])
def test_path_tricks_in_ids_find_nothing(c, path):
    answer = c.raw(f"GET {path} HTTP/1.1\r\n\r\n".encode())
    assert _status(answer) == 404 and b"root:" not in answer


def test_a_slow_client_gets_408_and_does_not_hold_up_others(c):
    slow = [socket.create_connection((c.host, c.http_port), timeout=30) for _ in range(10)]
    try:
        for s in slow:
            s.sendall(b"GET / HTTP/1.1\r\nX-Slow: ")  # and never finishes the header
        started = time.monotonic()
        assert c.json("/api/v1/messages")["total"] >= 1  # served while ten clients dawdle
        assert time.monotonic() - started < 5
        answer = b""
        while chunk := slow[0].recv(4096):  # the read deadline (10 s) ends the slow request
            answer += chunk
        assert _status(answer) == 408
    finally:
        for s in slow:
            s.close()


def test_clients_that_reset_mid_request_cost_nothing(c):
    for cut in (b"GET /api/v1/mess", b"PUT /api/v1/chaos HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"a\""):
        s = socket.create_connection((c.host, c.http_port), timeout=10)
        s.sendall(cut)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()  # RST
    assert c.json("/api/v1/info")["Messages"] >= 1


def test_broken_mime_is_still_listed_and_shown(catch):
    k = catch()
    deep = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (n, n) for n in range(300))
    broken = [
        b"Subject: no boundary\r\nContent-Type: multipart/mixed\r\n\r\nbody\r\n",
        (b"Subject: bad base64\r\nContent-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n"
         b"Content-Type: application/pdf; name=a.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!notbase64\r\n--x--\r\n"),
        b"Subject: =?bogus-charset?q?x?=\r\nContent-Type: text/plain; charset=no-such-charset\r\n\r\n\xff\xfe\r\n",
        b"Subject: deep\r\nMIME-Version: 1.0\r\n" + deep + b"end\r\n",
        b"From: <<<@@@>>>\r\nTo: ,,,;;;\r\nDate: not a date\r\nSubject: bad addresses\r\n\r\nx\r\n",
    ]
    for raw in broken:
        k.send(raw)
    listed = k.wait_for(len(broken))
    assert len(listed) == len(broken)
    for summary in listed:
        got = k.json(f"/api/v1/message/{summary['ID']}")
        assert got["ID"] == summary["ID"]
        assert k.request("GET", f"/view/{summary['ID']}")[0] == 200
        assert k.request("GET", f"/api/v1/message/{summary['ID']}/headers")[0] == 200
    assert k.alive()


def test_a_message_cannot_write_http_header_fields(catch):
    k = catch()
    raw = (b"Subject: smuggle\r\nContent-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\nContent-Type: text/plain\r\n\r\n"
           b"hi\r\n--x\r\nContent-Type: text/\r\n Set-Cookie: evil=1\r\nContent-Disposition: attachment; "
           b"filename=\"a\r\n Set-Cookie: evil=2.txt\"\r\n\r\ndata\r\n--x--\r\n")
    k.send(raw)
    [summary] = k.wait_for(1)
    [attachment] = k.json(f"/api/v1/message/{summary['ID']}")["Attachments"]
    answer = k.raw(f"GET /api/v1/message/{summary['ID']}/part/{attachment['PartID']} HTTP/1.1\r\n\r\n".encode())
    head = answer.split(b"\r\n\r\n", 1)[0]
    assert _status(answer) == 200
    assert not any(line.lower().startswith(b"set-cookie") for line in head.split(b"\r\n"))
