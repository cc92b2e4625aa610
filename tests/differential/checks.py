"""header_checks and body_checks sessions: the tables (regexp:, the only pattern type
Debian's postfix package has without postfix-pcre) and the messages that trigger each
action, at the top level, in MIME part headers, in an attached message and in body
lines.  Every session relays from inside to far.test (the sink); what the client is
told at the end of DATA is compared, and the mail that reaches the sink or the hold
queue with the other sessions'.
"""

from __future__ import annotations

from tests.differential.sessions import INSIDE, Session, message

HEADER_CHECKS = """\
/^Subject: differential hc-reject$/ REJECT
/^Subject: differential hc-reject-text$/ REJECT Header says no
/^Subject: differential hc-reject-dsn$/ REJECT 5.7.9 Policy says no
/^Subject: differential hc-defer$/ REJECT 4.7.1 Try again later
/^Subject: differential hc-warn$/ WARN warned by header
/^Subject: differential hc-hold$/ HOLD held by header
/^Subject: differential hc-discard$/ DISCARD dropped by header
/^X-Drop-Me:/ IGNORE
/^X-Strip-Me:/ STRIP stripped by header
/^Subject: differential hc-pass$/ PASS passed by header
/^X-After-Pass:/ REJECT rejected after a pass
/^Subject: differential hc-prepend$/ PREPEND X-Prepended: by header_checks
/^X-Replace-Me: (.*)/ REPLACE X-Replaced: $1
/^Subject: differential hc-redirect$/ REDIRECT redirected@far.test
/^Subject: differential hc-bcc$/ BCC copy@far.test
/^X-Bcc-Twice:/ BCC second@far.test
/^Subject: differential hc-bad-bcc$/ BCC nobody
/^Subject: differential hc-filter$/ FILTER smtp:@SINK@
/^Subject: differential hc-info$/ INFO informed by header
/^Subject: differential hc-dunno$/ DUNNO
/^Subject: differential hc-ok$/ OK
/^Subject: differential hc-bogus$/ BOGUS not an action
/^X-Folded: first.*second/ REJECT folded header matched
/^X-Case-Test: LOUD/ REJECT case does not matter
/^Content-Type:.*name="?evil\\.exe/ REJECT attachment refused
/^X-Nested-Bad:/ REJECT nested header refused
/^X-Discard-First:/ DISCARD
/^X-After-Discard:/ REJECT rejected after a discard
/^Received: from hc-received\\.test / REJECT our own Received header
"""

BODY_CHECKS = """\
/^body-reject-me/ REJECT Body rejected
/^body-hold-me/ HOLD held by body
/^body-discard-me/ DISCARD
/^body-replace-me (.*)/ REPLACE replaced: $1
/^body-ignore-me/ IGNORE
/^body-strip-me/ STRIP
/^body-warn-me/ WARN
/^body-prepend-me/ PREPEND prepended line
/^X-Part-Header:/ REJECT a part header seen as body
/^--bc-boundary-reject/ REJECT boundary seen as body
/^Subject: differential bc-/ REJECT a message header seen as body
"""

# which table sees a header that is not a MIME header in each place: the default
# tables ($header_checks) first, then a rule of each table's own for X-Which
MIME_ONLY = "/^X-Which: (.*)/ REJECT seen by mime_header_checks: $1\n"
NESTED_ONLY = "/^X-Which: (.*)/ REJECT seen by nested_header_checks: $1\n"

MAIN_CF = """\
header_checks = regexp:@TABLES@/header_checks.regexp
mime_header_checks = regexp:@TABLES@/header_checks.regexp, regexp:@TABLES@/mime_only.regexp
nested_header_checks = regexp:@TABLES@/header_checks.regexp, regexp:@TABLES@/nested_only.regexp
body_checks = regexp:@TABLES@/body_checks.regexp
"""

TABLES = {"header_checks.regexp": HEADER_CHECKS, "body_checks.regexp": BODY_CHECKS,
          "mime_only.regexp": MIME_ONLY, "nested_only.regexp": NESTED_ONLY}


def mime(boundary: str, parts: list[str]) -> tuple[str, str]:
    """(extra headers, body) of a multipart/mixed message with *parts* (each its own
    headers, a blank line and content)."""
    extra = f'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="{boundary}"\n'
    body = "preamble\n" + "".join(f"--{boundary}\n{part}" for part in parts) + f"--{boundary}--\n"
    return extra, body


def relay(tag: str, extra: str = "", body: str = "Hello.\n", messages: int = 1, to: str = "hc@far.test") -> Session:
    return Session(tag, INSIDE, ["EHLO client.test", "MAIL FROM:<a@client.test>", f"RCPT TO:<{to}>", "DATA",
                                 message(tag, to, extra=extra, body=body), "QUIT"], messages=messages)


_ATTACHMENT = mime("hc-b1", ["Content-Type: text/plain\n\ntext part\n",
                             'Content-Type: application/octet-stream; name="evil.exe"\n\nTVqQAAMAAAAEAAAA\n'])
_NESTED = mime("hc-b2", ["Content-Type: text/plain\n\ntext part\n",
                         "Content-Type: message/rfc822\n\nFrom: x@client.test\nX-Nested-Bad: yes\nSubject: inner\n\n"
                         "inner body\n"])
_PART_HEADER = mime("bc-b1", ["Content-Type: text/plain\nX-Part-Header: yes\n\ntext part\n"])
_BOUNDARY = mime("bc-boundary-reject", ["Content-Type: text/plain\n\ntext part\n"])
_WHICH_PART = mime("hc-w1", ["Content-Type: text/plain\nX-Which: part\n\ntext part\n"])
_WHICH_NESTED = mime("hc-w2", ["Content-Type: message/rfc822\n\nFrom: x@client.test\nX-Which: nested\n"
                               "Subject: inner\n\ninner body\n"])
_WHICH_NESTED_PART = mime("hc-w3", ["Content-Type: message/rfc822\n\nFrom: x@client.test\nSubject: inner\n"
                                    'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="hc-w4"\n\n'
                                    "--hc-w4\nContent-Type: text/plain\nX-Which: part of nested\n\ninner\n"
                                    "--hc-w4--\n"])

SESSIONS: list[Session] = [
    Session("hc-reject-then-next", INSIDE, [
        "EHLO client.test", "MAIL FROM:<a@client.test>", "RCPT TO:<hc@far.test>", "DATA",
        message("hc-reject", "hc@far.test"), "MAIL FROM:<a@client.test>", "RCPT TO:<hc@far.test>", "DATA",
        message("hc-after-reject", "hc@far.test"), "QUIT"], messages=1),
    Session("hc-own-received", INSIDE, ["EHLO hc-received.test", "MAIL FROM:<a@client.test>",
                                        "RCPT TO:<hc@far.test>", "DATA", message("hc-own-received"), "QUIT"]),
    Session("hc-header-only", INSIDE, ["EHLO client.test", "MAIL FROM:<a@client.test>", "RCPT TO:<hc@far.test>",
                                       "DATA", "DATA:Subject: differential hc-reject", "QUIT"]),
    relay("bc-long-line", body="x" * 2048 + "body-reject-me\n", messages=0),
    relay("hc-reject", messages=0),
    relay("hc-reject-text", messages=0),
    relay("hc-reject-dsn", messages=0),
    relay("hc-defer", messages=0),
    relay("hc-warn"),
    relay("hc-hold", messages=0),
    relay("hc-discard", messages=0),
    relay("hc-ignore", extra="X-Drop-Me: yes\n"),
    relay("hc-strip", extra="X-Strip-Me: yes\nX-Kept: yes\n", body="one\nbody-strip-me\ntwo\n"),
    relay("hc-pass", extra="X-After-Pass: yes\n", body="body-reject-me\n"),
    relay("hc-after-pass", extra="X-After-Pass: yes\n", messages=0),
    relay("hc-prepend"),
    relay("hc-replace", extra="X-Replace-Me: old value\n"),
    relay("hc-redirect"),
    relay("hc-bcc", extra="X-Bcc-Twice: yes\n"),
    relay("hc-bad-bcc"),
    relay("hc-filter"),
    relay("hc-info"),
    relay("hc-dunno"),
    relay("hc-ok"),
    relay("hc-bogus"),
    relay("hc-folded", extra="X-Folded: first\n\tsecond\n", messages=0),
    relay("hc-case", extra="x-case-test: loud and clear\n", messages=0),
    relay("hc-attachment", *_ATTACHMENT, messages=0),
    relay("hc-nested", *_NESTED, messages=0),
    relay("hc-discard-then-reject", extra="X-Discard-First: yes\nX-After-Discard: yes\n", messages=0),
    relay("bc-reject", body="first\nbody-reject-me now\nlast\n", messages=0),
    relay("bc-hold", body="body-hold-me\n", messages=0),
    relay("bc-discard", body="body-discard-me\n", messages=0),
    relay("bc-edits", body="one\nbody-replace-me with this\nbody-ignore-me\nbody-prepend-me\nbody-warn-me\n"),
    relay("bc-part-header", *_PART_HEADER),
    relay("bc-boundary", *_BOUNDARY, messages=0),
    relay("hc-which-primary", extra="X-Which: primary\n"),
    relay("hc-which-part", *_WHICH_PART, messages=0),
    relay("hc-which-nested", *_WHICH_NESTED, messages=0),
    relay("hc-which-nested-part", *_WHICH_NESTED_PART, messages=0),
]
