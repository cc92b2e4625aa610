"""Matching captured messages against ``wait_for``'s criteria."""

from __future__ import annotations

from typing import Any

from trimail.testing.content import CapturedMessage


def matches(message: CapturedMessage, match: dict[str, Any]) -> bool:
    for key, wanted in match.items():
        if key in ("recipient", "to"):
            if wanted.lower() not in (r.lower() for r in message.recipients):
                return False
        elif key in ("sender", "from_"):
            if message.sender.lower() != wanted.lower():
                return False
        elif key == "subject":
            if wanted not in message.subject:
                return False
        elif key == "header":
            name, value = wanted
            if value not in str(message.message.get(name, "")):
                return False
        elif key == "body":
            if wanted not in message.text and wanted not in message.html:
                return False
        elif key == "text":
            if wanted not in (message.text or message.html):  # an HTML-only message: its HTML
                return False
        elif key == "html":
            if wanted not in message.html:
                return False
        elif key == "attachment":
            if not any(wanted in (a.filename or "") for a in message.attachments):
                return False
        elif key == "predicate":
            if not wanted(message):
                return False
        else:
            raise TypeError(f"unknown match keyword {key!r}")
    return True
