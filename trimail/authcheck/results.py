"""The Authentication-Results header field (RFC 8601): writing ours, finding forged ones.

``header_field(authserv_id, spf, dkims, dmarc)`` gives the whole field, folded, one
method per line::

    Authentication-Results: mx.example.net;
    	spf=pass (mx.example.net: 192.0.2.1 is designated) smtp.mailfrom=a@example.org;
    	dkim=pass header.d=example.org header.s=sel header.a=rsa-sha256 header.b=AbCdEfGh;
    	dmarc=pass (p=reject dis=none) header.from=example.org

``claims(value, authserv_id)`` says whether a received field's value names our
authserv-id: such a field from outside is a forgery (RFC 8601 section 5) and is
removed before ours is added.

Security notes: every value placed in the field comes from the client or from
DNS; property values that are not plain tokens are quoted, comments lose their
parentheses and backslashes, and everything is made printable ASCII (anything
else becomes ``?``) and bounded, so a sender cannot add a method or a line of its
own.

Parameters: none read (the caller passes $myhostname).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from trimail.authcheck.dkimverify import DkimResult
from trimail.authcheck.dmarc import DmarcResult
from trimail.authcheck.spf import SpfResult
from trimail.log import printable

NAME = "Authentication-Results"
# a pvalue (RFC 8601 section 2.2) unquoted: an RFC 2045 token (no tspecials), or
# [local-part] "@" domain-name; anything else is written as a quoted-string
_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+^_`{|}~.-]+"
                    r"|(?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*)?"
                    r"@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*")


def _ascii(text: str, limit: int) -> str:
    """Printable ASCII only: RFC 8601 parsers (and most readers of the field) expect it."""
    return "".join(ch if " " <= ch <= "~" else "?" for ch in printable(text, limit))


def _value(text: str) -> str:
    text = _ascii(text, 255)
    if _TOKEN.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(text: str) -> str:
    text = _ascii(text, 120).replace("(", "").replace(")", "").replace("\\", "").strip()
    return f" ({text})" if text else ""


def spf_method(spf: SpfResult, authserv_id: str) -> str:
    comment = _comment(f"{authserv_id}: {spf.reason}" if spf.reason else "")
    prop = f"smtp.mailfrom={_value(spf.sender)}" if spf.identity == "mailfrom" else f"smtp.helo={_value(spf.domain)}"
    return f"spf={spf.result}{comment} {prop}"


def dkim_methods(dkims: Sequence[DkimResult]) -> list[str]:
    if not dkims:
        return ["dkim=none"]
    methods = []
    for d in dkims:
        props = [f"header.d={_value(d.domain or 'unknown')}"]
        if d.selector:
            props.append(f"header.s={_value(d.selector)}")
        if d.algorithm:
            props.append(f"header.a={_value(d.algorithm)}")
        if d.signature:
            props.append(f"header.b={_value(d.signature)}")
        methods.append(f"dkim={d.result}{_comment(d.reason)} {' '.join(props)}")
    return methods


def dmarc_method(dmarc: DmarcResult) -> str:
    if not dmarc.header_from:
        return f"dmarc={dmarc.result}{_comment(dmarc.reason)}"
    comment = _comment(f"p={dmarc.policy} dis={dmarc.disposition.upper()}") if dmarc.result in ("pass", "fail") \
        else _comment(dmarc.reason)
    return f"dmarc={dmarc.result}{comment} header.from={_value(dmarc.header_from)}"


def header_field(authserv_id: str, spf: SpfResult | None, dkims: Sequence[DkimResult] | None,
                 dmarc: DmarcResult | None) -> bytes:
    """The field with CRLF; ``none`` as the only result when no method ran (RFC 8601 2.2)."""
    methods = []
    if spf is not None:
        methods.append(spf_method(spf, authserv_id))
    if dkims is not None:
        methods += dkim_methods(dkims)
    if dmarc is not None:
        methods.append(dmarc_method(dmarc))
    if not methods:
        return f"{NAME}: {authserv_id}; none\r\n".encode()
    return (f"{NAME}: {authserv_id};\r\n\t" + ";\r\n\t".join(methods) + "\r\n").encode("utf-8")


def _strip_comments(text: str) -> str:
    """The value without leading white space and RFC 5322 comments (nested ones too)."""
    pos, depth = 0, 0
    while pos < len(text):
        ch = text[pos]
        if ch == "(":
            depth += 1
        elif ch == ")" and depth:
            depth -= 1
        elif ch == "\\" and depth:
            pos += 1
        elif depth == 0 and not ch.isspace():
            break
        pos += 1
    return text[pos:]


def claims(value: str, authserv_id: str) -> bool:
    """Does this Authentication-Results value carry *authserv_id* (case-insensitively)?"""
    rest = _strip_comments(value.replace("\r\n", ""))
    match = re.match(r'"((?:[^"\\]|\\.)*)"|[^\s;(]+', rest)
    if not match:
        return False
    found = match.group(1) if match.group(1) is not None else match.group(0)
    return found.lower().rstrip(".") == authserv_id.lower().rstrip(".")
