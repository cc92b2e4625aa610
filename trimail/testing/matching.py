"""Matching captured messages against ``wait_for``'s criteria, and saying why a
message does not match (the failure messages list, per captured message, each
criterion it missed)."""

from __future__ import annotations

from typing import Any

from trimail.testing.content import CapturedMessage

CRITERIA = ("recipient", "to", "sender", "from_", "subject", "header", "body", "text", "html", "attachment",
            "predicate")


def _short(text: str, limit: int = 60) -> str:
    """*text* for a failure message: one line, at most *limit* characters."""
    text = " ".join(text.split())
    return repr(text if len(text) <= limit else text[:limit - 3] + "...")


def _miss(message: CapturedMessage, key: str, wanted: Any) -> str | None:
    """Why *message* fails the criterion *key* = *wanted*; None when it passes."""
    if key in ("recipient", "to"):
        if wanted.lower() not in (r.lower() for r in message.recipients):
            return f"recipient <{wanted}> not among {','.join(f'<{r}>' for r in message.recipients)}"
    elif key in ("sender", "from_"):
        if message.sender.lower() != wanted.lower():
            return f"sender <{wanted}> is not <{message.sender}>"
    elif key == "subject":
        if wanted not in message.subject:
            return f"subject {wanted!r} not in {message.subject!r}"
    elif key == "header":
        name, value = wanted
        present = message.message.get(name)
        if present is None:
            return f"no {name} header"
        if value not in str(present):
            return f"header {name} {value!r} not in {str(present)!r}"
    elif key == "body":
        if wanted not in message.text and wanted not in message.html:
            return f"body {wanted!r} not in the text {_short(message.text)} or the HTML {_short(message.html)}"
    elif key == "text":
        content = message.text or message.html  # an HTML-only message: its HTML
        if wanted not in content:
            return f"text {wanted!r} not in {_short(content)}"
    elif key == "html":
        if not message.html:
            return f"html {wanted!r}: the message has no HTML part"
        if wanted not in message.html:
            return f"html {wanted!r} not in {_short(message.html)}"
    elif key == "attachment":
        names = [a.filename or "(no name)" for a in message.attachments]
        if not any(wanted in (a.filename or "") for a in message.attachments):
            return f"attachment {wanted!r} not among {names or 'no attachments'}"
    elif key == "predicate":
        if not wanted(message):
            return f"predicate {getattr(wanted, '__name__', repr(wanted))} is false"
    else:
        raise TypeError(f"unknown match keyword {key!r} (known: {', '.join(CRITERIA)})")
    return None


def mismatches(message: CapturedMessage, match: dict[str, Any]) -> list[str]:
    """Every criterion of *match* that *message* misses, each said in a few words."""
    return [why for key, wanted in match.items() if (why := _miss(message, key, wanted)) is not None]


def matches(message: CapturedMessage, match: dict[str, Any]) -> bool:
    return all(_miss(message, key, wanted) is None for key, wanted in match.items())
