"""The catcher's HTTP/1.1 server on trio: one request per connection, answered by
``Api.answer`` (catch/api.py), then closed.

The request is parsed by ``parse_request`` (pure, no I/O).  Bounds: the request
line and header fields at most 16 KiB (``431``), a body at most 1 MiB (``413``,
with ``Content-Length`` only; chunked bodies get ``411``), the whole request read
within 10 s and answered within 30 s (a slow client gets ``408`` or is dropped), at
most 64 connections served at once.  A search whose text budget ran out before it
read every message it needed (``Response.unfinished``) is answered again, with
``STEP_PAUSE`` for the other clients between steps, for up to ``FINISH_TIME``: the
client gets the whole answer, and nobody waits behind hostile HTML for more than one
step (about 1.5 s).  Every connection runs in its own error
boundary (``net.reading.serve_requests``): malformed requests get a 4xx, a bug in a
handler costs that request a ``500`` and a log line, never the process.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from http import HTTPStatus
from urllib.parse import parse_qs, unquote, urlsplit

import trio

from trimail.catch.api import Api, Request, Response
from trimail.net.reading import request_read, serve_requests

log = logging.getLogger("trimail.catch")

MAX_HEAD = 16 * 1024
MAX_BODY = 1024 * 1024
READ_TIMEOUT = 10.0
ANSWER_TIMEOUT = 30.0
FINISH_TIME = 20.0  # seconds an unfinished search is answered again, a step at a time
STEP_PAUSE = 0.05  # seconds the other clients have between two steps of an unfinished search
METHODS = {"GET", "HEAD", "PUT", "DELETE", "POST", "OPTIONS"}


# the blank line that ends the head: CRLF CRLF, or LF alone as a line end (RFC 9112 2.2 lets a
# server take it; Go's net/http, so Mailpit, does, and `printf 'GET / HTTP/1.0\n\n' | nc` sends it)
_HEAD_END = re.compile(rb"\r?\n\r?\n")


class BadRequest(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status


@dataclasses.dataclass(slots=True)
class Head:
    request: Request
    length: int


def parse_request(head: bytes) -> Head:
    """The request line and header fields (up to the blank line, excluded)."""
    try:
        text = head.decode("iso-8859-1")
        lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]  # CRLF, or LF alone
        method, target, version = lines[0].split(" ")
    except ValueError:
        raise BadRequest(400, "malformed request line") from None
    if not version.startswith("HTTP/1.") or not method.isalpha() or not method.isupper():
        raise BadRequest(400, "malformed request line")
    if method not in METHODS:
        raise BadRequest(405, "method not allowed")
    if not target.startswith("/"):
        raise BadRequest(400, "request target must be a path")
    fields: dict[str, str] = {}
    if any("\r" in line for line in lines):  # a bare CR (RFC 9112 2.2)
        raise BadRequest(400, "bare CR in the request")
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip() or line[:1] in " \t":
            raise BadRequest(400, "malformed header field")
        key = name.lower()
        if key in ("content-length", "transfer-encoding", "host") and key in fields:
            raise BadRequest(400, f"more than one {name} field")  # RFC 9112 6.3: a smuggling attempt
        fields[key] = value.strip()
    if "transfer-encoding" in fields:
        raise BadRequest(411, "send a Content-Length")
    length_text = fields.get("content-length", "0")
    if not length_text.isdigit() or not length_text.isascii():  # int() would take "+5", " 5", "5_0", "٥"
        raise BadRequest(400, "bad Content-Length")
    try:
        length = int(length_text)
    except ValueError:
        raise BadRequest(400, "bad Content-Length") from None
    if length < 0:
        raise BadRequest(400, "bad Content-Length")
    if length > MAX_BODY:
        raise BadRequest(413, "body too large")
    try:
        parts = urlsplit(target)
        query = parse_qs(parts.query, keep_blank_values=True, max_num_fields=100) if parts.query else {}
    except ValueError:  # a malformed target, or more than 100 query fields
        raise BadRequest(400, "malformed request target") from None
    return Head(Request(method, unquote(parts.path), query), length)


def render(response: Response, *, head_only: bool = False) -> bytes:
    reason = HTTPStatus(response.status).phrase if response.status in HTTPStatus._value2member_map_ else ""
    lines = [f"HTTP/1.1 {response.status} {reason}", f"Content-Type: {response.content_type}",
             f"Content-Length: {len(response.body)}", "Connection: close", "Cache-Control: no-store",
             "X-Content-Type-Options: nosniff", "Referrer-Policy: no-referrer"]
    # no value may end the header early, whatever a message put into it
    lines += [f"{name}: {value.replace(chr(13), ' ').replace(chr(10), ' ')}" for name, value in response.headers]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")
    return head if head_only else head + response.body


async def _read(stream: trio.abc.ReceiveStream) -> tuple[Head, bytes]:
    data = b""
    while (end := _HEAD_END.search(data)) is None:
        if len(data) > MAX_HEAD:
            raise BadRequest(431, "request header fields too large")
        chunk = await stream.receive_some(MAX_HEAD)
        if not chunk:
            raise EOFError
        data += chunk
    head_bytes, body = data[:end.start()], data[end.end():]
    if len(head_bytes) > MAX_HEAD:
        raise BadRequest(431, "request header fields too large")
    head = parse_request(head_bytes)
    while len(body) < head.length:
        chunk = await stream.receive_some(min(65536, head.length - len(body)))
        if not chunk:
            raise EOFError
        body += chunk
    return head, body[:head.length]


async def handle(stream: trio.SocketStream, api: Api) -> None:
    response: Response
    head_only = False
    with trio.move_on_after(ANSWER_TIMEOUT):
        try:
            with trio.fail_after(READ_TIMEOUT):
                head, body = await _read(stream)
            request_read()
        except BadRequest as exc:
            response = Response(exc.status, f"{exc}\n".encode())
        except trio.TooSlowError:
            response = Response(408, b"request timeout\n")
        except EOFError:
            return
        else:
            head.request.body = body
            head_only = head.request.method == "HEAD"
            try:
                response = api.answer(head.request)
                finish_by = trio.current_time() + FINISH_TIME
                while response.unfinished and trio.current_time() < finish_by:  # the texts read are kept:
                    await trio.sleep(STEP_PAUSE)  # the other clients' turn, then the next step
                    response = api.answer(head.request)
            except Exception:  # a bug costs this request, logged; never the catcher
                log.exception("catch: %s %s failed", head.request.method, head.request.path)
                response = Response(500, b"internal error\n")
        await stream.send_all(render(response, head_only=head_only))
        with trio.move_on_after(1):  # let the client read the answer before the close: closing with
            await stream.send_eof()  # unread input would reset the connection and lose the answer
            drained = 0
            while drained < MAX_BODY and (chunk := await stream.receive_some(65536)):
                drained += len(chunk)


async def serve_http(listener: trio.SocketListener, api: Api) -> None:
    """Serve until cancelled; each connection in its own boundary."""

    async def one(stream: trio.SocketStream) -> None:
        await handle(stream, api)

    await serve_requests(listener, one, task="catch http request", limit=64)
