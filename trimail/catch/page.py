"""The catcher's web page: the captured mail (``/``, a search box, 50 messages a
page as Mailpit's UI pages, through the API's ``start`` and ``limit``) and one
message (``/view/{ID}``: HTML, text, header fields, raw source, attachments).

Rendered on the server as plain HTML, with no script at all and no external asset,
so it works with JavaScript off and in ``chromium --dump-dom``.  Everything taken
from a message is escaped.  The page's Content-Security-Policy allows nothing but
its own inline style and frames from itself; a message's HTML is shown in an
``<iframe sandbox>`` whose document (``/view/{ID}.html``) is served with a CSP of
its own (``sandbox``, no scripts, nothing loaded from elsewhere: a tracking pixel
stays silent; its ``cid:`` images are shown from the message's own parts).
"""

from __future__ import annotations

import re
from html import escape
from urllib.parse import quote, urlencode

from trimail.catch.mime import created_time
from trimail.catch.store import Mailbox, Stored

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d2433;background:#f4f6fa}
header{background:#23395d;color:#fff;padding:10px 18px;display:flex;gap:18px;align-items:center}
header a{color:#fff;text-decoration:none;font-weight:600;font-size:18px}
header form{margin-left:auto}input{padding:5px 8px;width:260px;border:0;border-radius:4px}
main{padding:14px 18px}table{border-collapse:collapse;width:100%;background:#fff}
td,th{padding:7px 10px;border-bottom:1px solid #dde3ee;text-align:left;vertical-align:top}
th{background:#e8edf6}tr.unread td{font-weight:600}td.subject a{color:#1d4ed8}
.empty{padding:30px;text-align:center;color:#667}.meta td:first-child{width:110px;color:#556}
section{background:#fff;margin:14px 0;padding:10px 14px;border:1px solid #dde3ee}
h2{font-size:15px;margin:0 0 8px}pre{white-space:pre-wrap;word-break:break-word;margin:0}
iframe{width:100%;height:420px;border:1px solid #dde3ee;background:#fff}
nav{margin:0 0 10px;display:flex;gap:14px}nav a{color:#1d4ed8}.off{color:#99a}
"""

PAGE_CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; frame-src 'self'; "
            "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
# the message's own HTML: a unique origin, no scripts, no forms, nothing loaded from anywhere
BODY_CSP = ("sandbox; default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
            "frame-ancestors 'self'")
PAGE_HEADERS = (("Content-Security-Policy", PAGE_CSP), ("X-Frame-Options", "DENY"))
DEFAULT_LIMIT = 50  # messages a page (and an API list) shows unless ?limit= says otherwise, as in Mailpit


def _document(title: str, body: str, query: str = "", limit: int = DEFAULT_LIMIT) -> bytes:
    """A page; a search from its box keeps the list's *limit* (a new search starts at its first page)."""
    keep = f"<input type=hidden name=limit value={limit}>" if limit != DEFAULT_LIMIT else ""
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{escape(title)}</title>"
            f"<meta name=viewport content='width=device-width'><style>{STYLE}</style></head><body>"
            f"<header><a href='/'>trimail catch</a><form action='/' method=get>{keep}"
            f"<input name=query placeholder='Search: to: from: subject: ...' value='{escape(query)}'>"
            f"</form></header><main>{body}</main></body></html>").encode()


def _contacts(contacts: list[dict[str, str]]) -> str:
    return ", ".join(escape(f"{c['Name']} <{c['Address']}>" if c["Name"] else c["Address"]) for c in contacts)


def _link(query: str, start: int, limit: int) -> str:
    """``/`` with Mailpit's UI parameters: ``start`` when not 0, ``limit`` when not the default."""
    params = {"query": query} if query.strip() else {}
    params |= {"start": str(start)} if start > 0 else {}
    params |= {"limit": str(limit)} if limit != DEFAULT_LIMIT else {}
    return "/?" + urlencode(params) if params else "/"


def _paging(start: int, limit: int, shown: int, matched: int, query: str) -> str:
    """Mailpit's "1-50 of 500" and its buttons for the previous and the next page."""
    first, last = (start + 1, start + shown) if shown else (start, start)
    prev = (f"<a id=prev href='{escape(_link(query, max(0, start - limit), limit))}'>&lsaquo; Newer</a>"
            if start > 0 and limit > 0 else "<span class=off>&lsaquo; Newer</span>")
    after = (f"<a id=next href='{escape(_link(query, start + limit, limit))}'>Older &rsaquo;</a>"
             if 0 < limit and start + limit < matched else "<span class=off>Older &rsaquo;</span>")
    return f"<nav><span id=shown>{first}-{last} of {matched}</span> {prev} {after}</nav>"


def index(mailbox: Mailbox, matched: list[Stored], shown: list[Stored], start: int, limit: int,
          query: str = "", untold: int = 0) -> bytes:
    """One page of the list: *shown*, the part of *matched* (everything, or what
    *query* found) from *start* on that the API's ``start`` and ``limit`` give.  No
    snippets: nothing here reads a message's HTML, except a search."""
    if not shown:
        empty = "No messages on this page." if matched else "No messages" + (" match." if query.strip() else " yet.")
        rows = f"<p class=empty id=empty>{empty}</p>"
    else:
        body = []
        for stored in shown:
            view = stored.view
            css = "" if stored.read else " class=unread"
            subject = escape(view.subject or "(no subject)")
            body.append(f"<tr{css}><td>{_contacts([view.sender()])}</td><td>{_contacts(view.addresses('To'))}</td>"
                        f"<td class=subject><a href='/view/{stored.id}'>{subject}</a></td>"
                        f"<td>{escape(created_time(stored.created)[:19].replace('T', ' '))}</td>"
                        f"<td>{len(view.raw)}</td></tr>")
        rows = ("<table id=messages><thead><tr><th>From</th><th>To</th><th>Subject</th><th>Received (UTC)</th>"
                "<th>Size</th></tr></thead><tbody>" + "".join(body) + "</tbody></table>")
    count = f"<p>{mailbox.total} message(s), {mailbox.unread} unread</p>"
    if untold:
        count += (f"<p id=incomplete>{untold} message(s) not searched yet (their HTML is still being read): "
                  f"reload for the rest.</p>")
    if matched:
        count += _paging(start, limit, len(shown), len(matched), query)
    return _document("trimail catch", count + rows, query, limit)


def message(stored: Stored) -> bytes:
    view = stored.view
    text, html = view.bodies
    attachments, inline = view.listed()
    meta = [("From", _contacts([view.sender()])), ("To", _contacts(view.addresses("To"))),
            ("Cc", _contacts(view.addresses("Cc"))), ("Bcc", _contacts(view.addresses("Bcc"))),
            ("Subject", escape(view.subject)), ("Date", escape(view.header("Date"))),
            ("Size", str(len(view.raw)))]
    sections = ["<table class=meta>" + "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in meta if v)
                + "</table>"]
    if html:
        sections.append(f"<section id=html><h2>HTML</h2><iframe sandbox title='message HTML' "
                        f"src='/view/{stored.id}.html'></iframe></section>")
    sections.append(f"<section id=text><h2>Text</h2><pre>{escape(text)}</pre></section>")
    parts = attachments + inline
    if parts:
        links = "".join(f"<li><a href='/api/v1/message/{stored.id}/part/{quote(p.part_id)}'>"
                        f"{escape(p.filename or p.content_id)}</a> ({escape(p.content_type)}, {len(p.content)} bytes)"
                        f"</li>" for p in parts)
        sections.append(f"<section id=attachments><h2>Attachments</h2><ul>{links}</ul></section>")
    fields = "".join(f"<tr><td>{escape(name)}</td><td>{escape(value)}</td></tr>" for name, value in view.fields)
    sections.append(f"<section id=headers><h2>Headers</h2><table>{fields}</table></section>")
    raw = view.raw.decode("utf-8", "replace")
    sections.append(f"<section id=raw><h2>Raw <a href='/api/v1/message/{stored.id}/raw?dl=1'>(download)</a></h2>"
                    f"<pre>{escape(raw)}</pre></section>")
    return _document(view.subject or "(no subject)", "".join(sections))


_CID_REF = re.compile(r"(?i)(=[\"']?)cid:([^\"'\s>;]{1,998})")  # a Content-ID is at most a line long


def body_html(stored: Stored) -> bytes:
    """The message's HTML with ``cid:`` references pointing at the parts they name
    (as Mailpit's /view/{ID}.html does), so inline images show.  One pass over the
    HTML, each reference looked up among the parts' Content-IDs (the first part
    wins, case ignored): a pattern per part, each scanning the whole HTML, took 70 s
    for a 5 MB message with 999 inline parts, on the catcher's one thread."""
    html = stored.view.html
    attachments, inline = stored.view.listed()
    targets: dict[str, tuple[int, str]] = {}
    for order, part in enumerate(inline + attachments):
        if part.content_id:
            targets.setdefault(part.content_id.lower(),
                               (order, f"/api/v1/message/{stored.id}/part/{quote(part.part_id)}"))
    if not targets:
        return html.encode("utf-8")

    def swap(match: re.Match[str]) -> str:
        ref, end = match.group(2), match.end()
        # the reference ends at a quote, white space, ">", ";" or "/": each "/" in it may end it
        ends = [at for at, char in enumerate(ref) if char == "/"]
        if end < len(html) and (html[end] in "\"'>;/" or html[end].isspace()):
            ends.append(len(ref))
        found = [(targets[ref[:at].lower()], at) for at in ends if ref[:at].lower() in targets]
        if not found:
            return match.group(0)
        (_, target), at = min(found)
        return match.group(1) + target + ref[at:]

    return _CID_REF.sub(swap, html).encode("utf-8")
