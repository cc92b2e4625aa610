"""Mailpit's API v1, the calls test clients use, as a pure function of the request:
``answer(request, mailbox, chaos) -> Response`` (no sockets; catch/server.py moves
the bytes).  JSON field names, defaults, status codes and error texts are Mailpit's
(server/apiv1 in github.com/axllent/mailpit), so clients written for Mailpit work.

Routes: GET/PUT/DELETE /api/v1/messages, GET/DELETE /api/v1/search?query=,
GET /api/v1/message/{ID} (``latest`` too, optionally ``?query=``), .../headers,
.../raw (``?dl=1``), .../part/{PartID}, GET /api/v1/info, /api/v1/webui,
GET/PUT /api/v1/chaos, /livez, /readyz; the web page at ``/`` (catch/page.py).
IDs that are not in Mailpit's ID alphabet are simply not found: no ID reaches
anything but a dictionary lookup.

One answer reads the HTML of the messages it lists or searches into text for at
most ``REQUEST_BUDGET`` seconds (catch/text.py): a message not read by then has an
empty ``Snippet``, and a search that could not read every message it needed is
``unfinished``: the server answers it again after the other clients' turn, going on
where the last answer stopped (catch/server.py), so a search is whole and nobody
waits behind it.  One still unfinished after ``server.FINISH_TIME`` tells the
messages it did not search in an ``X-Search-Incomplete`` header, or, when it must
be whole (one that changes messages, ``latest?query=``), is refused (``503``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any
from urllib.parse import quote

from trimail import __version__
from trimail.catch import page
from trimail.catch.chaos import Chaos, ChaosError
from trimail.catch.mime import go_time
from trimail.catch.store import Mailbox, SearchError, Stored
from trimail.catch.text import REQUEST_BUDGET, shared_budget

NOT_FOUND = b"404 page not found"


@dataclasses.dataclass(slots=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    body: bytes = b""

    def arg(self, name: str, default: str = "") -> str:
        values = self.query.get(name)
        return values[0] if values else default


@dataclasses.dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    unfinished: bool = False  # the request's text budget left a message unsearched: ask again (server.py)


def ok_text(text: str = "ok") -> Response:
    return Response(200, text.encode(), "text/plain")


def error(text: str, status: int = 400) -> Response:
    return Response(status, text.encode(), "text/plain")


class Incomplete(Exception):
    """A search that must be whole (one that changes messages, or ``latest``) met
    messages it could not search within the request's budget."""

    def __init__(self, untold: int) -> None:
        super().__init__(f"Error: search incomplete ({untold} message(s) not searched yet), try again")


def as_json(value: Any) -> Response:
    return Response(200, json.dumps(value, ensure_ascii=False).encode() + b"\n", "application/json")


def _decode(body: bytes) -> dict[str, Any] | None:
    """A JSON object with its keys in lower case (Go's decoder matches field names
    without regard to case), or None when the body is not one."""
    try:
        data = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError):
        return None
    return {str(k).lower(): v for k, v in data.items()} if isinstance(data, dict) else None


def _ids(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


def _start_limit(request: Request) -> tuple[int, int]:
    def number(name: str, default: int, minimum: int) -> int:
        try:
            value = int(request.arg(name))
        except ValueError:
            return default
        return value if value >= minimum else default

    return number("start", 0, 1), number("limit", page.DEFAULT_LIMIT, 0)


def _page(messages: list[Stored], request: Request) -> list[Stored]:
    start, limit = _start_limit(request)
    return messages[start:start + limit] if limit > 0 else messages


def _summary(mailbox: Mailbox, page: list[Stored], start: int, matched: list[Stored]) -> dict[str, Any]:
    return {"total": mailbox.total, "unread": mailbox.unread, "count": len(page),
            "messages_count": len(matched), "messages_unread": sum(1 for m in matched if not m.read),
            "start": start, "tags": [], "messages": [m.summary() for m in page]}


def message_json(stored: Stored) -> dict[str, Any]:
    view = stored.view
    text, html = view.bodies
    attachments, inline = view.listed()
    date = view.date() or stored.created
    return_path = view.header("Return-Path").strip().strip("<>") or view.sender()["Address"]
    # Read: no longer in Mailpit's Message, but clients written for Mailpit 1.x before 1.6 require it
    return {"ID": stored.id, "MessageID": view.message_id, "Read": True, "From": view.sender(), "To": view.addresses("To"),
            "Cc": view.addresses("Cc"), "Bcc": view.addresses("Bcc"), "ReplyTo": view.addresses("Reply-To"),
            "ReturnPath": return_path, "Subject": view.subject,
            "ListUnsubscribe": {"Header": view.header("List-Unsubscribe"), "Links": [], "Errors": "",
                                "HeaderPost": view.header("List-Unsubscribe-Post")},
            "Date": go_time(date), "Tags": [], "Username": stored.username, "Text": text, "HTML": html,
            "Size": len(view.raw), "Inline": [p.summary() for p in inline],
            "Attachments": [p.summary() for p in attachments]}


class Api:
    def __init__(self, mailbox: Mailbox, chaos: Chaos) -> None:
        self.mailbox = mailbox
        self.chaos = chaos
        self.started = time.monotonic()

    def answer(self, request: Request) -> Response:
        try:
            with shared_budget(REQUEST_BUDGET):
                return self._answer(request)
        except SearchError as exc:  # a query of too many terms, from any route that searches
            return error(str(exc))
        except Incomplete as exc:  # a later request goes on reading: try again
            response = error(str(exc), 503)
            response.headers.append(("Retry-After", "1"))
            response.unfinished = True
            return response

    def _whole(self, query: str, first: bool = False) -> list[Stored]:
        """What *query* finds, all of it (Incomplete otherwise)."""
        matched, untold = self.mailbox.search(query, first=first)
        if untold:
            raise Incomplete(untold)
        return matched

    def _answer(self, request: Request) -> Response:
        path, method = request.path, request.method
        if method == "OPTIONS" and path.startswith("/api/v1/"):
            return ok_text("")
        if method in ("GET", "HEAD") and (path == "/" or path.startswith("/view/")):
            return self.web(request)
        if path in ("/livez", "/readyz") and method == "GET":
            return ok_text("ok")
        routes = {
            "/api/v1/messages": {"GET": self.list, "PUT": self.set_read, "DELETE": self.delete},
            "/api/v1/search": {"GET": self.search, "DELETE": self.delete_search},
            "/api/v1/info": {"GET": self.info},
            "/api/v1/tags": {"GET": lambda request: as_json([])},  # no tags here (docs/catch.md)
            "/api/v1/webui": {"GET": self.webui},
            "/api/v1/chaos": {"GET": self.get_chaos, "PUT": self.set_chaos},
        }
        if path in routes:
            handler = routes[path].get("GET" if method == "HEAD" else method)
            if handler is None:
                return Response(405, b"Method Not Allowed\n", headers=[("Allow", ", ".join(routes[path]))])
            return handler(request)
        if path.startswith("/api/v1/message/"):
            if method not in ("GET", "HEAD"):
                return Response(405, b"Method Not Allowed\n", headers=[("Allow", "GET")])
            return self.message(request, path[len("/api/v1/message/"):].split("/"))
        return error(NOT_FOUND.decode(), 404)

    # -- lists -------------------------------------------------------------------

    def list(self, request: Request) -> Response:
        everything = self.mailbox.newest_first()
        page = _page(everything, request)
        return as_json(_summary(self.mailbox, page, _start_limit(request)[0], everything))

    def search(self, request: Request) -> Response:
        query = request.arg("query").strip()
        if not query:
            return error("Error: no search query")
        matched, untold = self.mailbox.search(query)
        page = _page(matched, request)
        response = as_json(_summary(self.mailbox, page, _start_limit(request)[0], matched))
        if untold:  # Mailpit's JSON has no field for it; its clients read the matches found
            response.headers.append(("X-Search-Incomplete", str(untold)))
            response.unfinished = True
        return response

    def delete_search(self, request: Request) -> Response:
        query = request.arg("query").strip()
        if not query:
            return error("Error: no search query")
        self.mailbox.delete([m.id for m in self._whole(query)])
        return ok_text()

    def delete(self, request: Request) -> Response:
        """Mailpit: a body that is not JSON, or no IDs, deletes everything."""
        data = _decode(request.body)
        ids = _ids(data.get("ids")) if data else []
        self.mailbox.delete(ids or None)
        return ok_text()

    def set_read(self, request: Request) -> Response:
        data = _decode(request.body)
        if data is None:
            return error("invalid JSON body")
        if not isinstance(data.get("ids", []), list):
            return error("IDs must be an array of message IDs")
        ids, search, read = _ids(data.get("ids")), str(data.get("search") or ""), bool(data.get("read"))
        if ids and search:
            return error("You may specify either IDs or a search query, not both")
        if search:
            targets = self._whole(search)
        elif ids:
            targets = [m for m in (self.mailbox.get(i) for i in ids) if m is not None]
        else:
            targets = self.mailbox.newest_first()
        for stored in targets:
            stored.read = read
        return ok_text()

    # -- one message ---------------------------------------------------------------

    def _find(self, request: Request, message_id: str) -> Stored | None:
        if message_id == "latest":
            query = request.arg("query").strip()
            found = self._whole(query, first=True) if query else self.mailbox.newest_first()
            return found[0] if found else None
        return self.mailbox.get(message_id)

    def message(self, request: Request, words: list[str]) -> Response:
        stored = self._find(request, words[0]) if words and words[0] else None
        if stored is None:
            return error("Message not found" if words[:1] == ["latest"] else NOT_FOUND.decode(), 404)
        rest = words[1:]
        if not rest:
            stored.read = True
            return as_json(message_json(stored))
        if rest == ["headers"]:
            return as_json(stored.view.headers())
        if rest == ["raw"]:
            response = Response(200, stored.raw, "text/plain; charset=utf-8")
            if request.arg("dl") == "1":
                response.headers.append(("Content-Disposition", f'attachment; filename="{stored.id}.eml"'))
            return response
        if len(rest) == 2 and rest[0] == "part":
            part = stored.view.part(rest[1])
            if part is None:
                return error(NOT_FOUND.decode(), 404)
            name = part.filename or part.content_id
            return Response(200, part.content, part.content_type,
                            [("Content-Disposition", f'inline; filename="{quote(name)}"'),
                             ("Content-Security-Policy", "sandbox"), ("X-Content-Type-Options", "nosniff")])
        return error(NOT_FOUND.decode(), 404)

    # -- the web page (catch/page.py) -------------------------------------------------

    def web(self, request: Request) -> Response:
        if request.path == "/":  # the page pages as GET /api/v1/messages and /api/v1/search do
            query = request.arg("query")
            matched, untold = self.mailbox.search(query) if query.strip() else (self.mailbox.newest_first(), 0)
            start, limit = _start_limit(request)
            html = page.index(self.mailbox, matched, _page(matched, request), start, limit, query, untold)
            return Response(200, html, "text/html; charset=utf-8", list(page.PAGE_HEADERS), bool(untold))
        name = request.path[len("/view/"):]
        if name.endswith((".html", ".txt")):  # Mailpit's "testing" views: the HTML or the text alone
            stem, _, kind = name.rpartition(".")
            stored = self._find(request, stem)
            if stored is None:
                return error("Message not found", 404)
            stored.read = True
            text, html = stored.view.bodies
            if kind == "txt":
                return Response(200, text.encode("utf-8"), "text/plain; charset=utf-8")
            if not html:
                return error("This message does not contain a HTML part", 404)
            return Response(200, page.body_html(stored), "text/html; charset=utf-8",
                            [("Content-Security-Policy", page.BODY_CSP)])
        stored = self._find(request, name)
        if stored is None:
            return error(NOT_FOUND.decode(), 404)
        stored.read = True
        return Response(200, page.message(stored), "text/html; charset=utf-8", list(page.PAGE_HEADERS))

    # -- the rest ------------------------------------------------------------------

    def info(self, request: Request) -> Response:
        mailbox = self.mailbox
        return as_json({"Version": f"trimail {__version__}", "LatestVersion": "disabled", "Database": "",
                        "DatabaseSize": 0, "Messages": mailbox.total, "Unread": mailbox.unread, "Tags": {},
                        "RuntimeStats": {"Uptime": int(time.monotonic() - self.started), "Memory": 0,
                                         "MessagesDeleted": mailbox.deleted, "SMTPAccepted": mailbox.accepted,
                                         "SMTPAcceptedSize": mailbox.accepted_size,
                                         "SMTPRejected": mailbox.rejected, "SMTPIgnored": 0}})

    def webui(self, request: Request) -> Response:
        relay = {"Enabled": False, "SMTPServer": "", "ReturnPath": "", "AllowedRecipients": "",
                 "BlockedRecipients": "", "OverrideFrom": "", "PreserveMessageIDs": False,
                 "RecipientAllowlist": ""}
        return as_json({"Label": "trimail catch", "MessageRelay": relay, "SpamAssassin": False,
                        "ChaosEnabled": self.chaos.enabled, "DuplicatesIgnored": False,
                        "HideDeleteAllButton": False})

    def get_chaos(self, request: Request) -> Response:
        if not self.chaos.enabled:
            return error("Chaos is not enabled")
        return as_json(self.chaos.triggers())

    def set_chaos(self, request: Request) -> Response:
        if not self.chaos.enabled:
            return error("Chaos is not enabled")
        data = _decode(request.body)
        if data is None:
            return error("invalid JSON body")
        try:
            self.chaos.set_all(data)
        except ChaosError as exc:
            return error(str(exc))
        return as_json(self.chaos.triggers())


__all__ = ["Api", "Request", "Response", "go_time"]
