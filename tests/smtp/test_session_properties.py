"""Property tests for Postfix's session details in the sans-IO machine and the resolver:
header-like command lines, connect-time refusal, unqualified addresses."""

from __future__ import annotations

import string

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.smtp.driver import Driver
from trimail import rewrite
from trimail.smtp.events import Closed, Connect, NonSmtpCommand
from trimail.smtp.replies import Reply
from trimail.smtp.server import Settings

BYE = "221 2.7.0 Error: I can break rules, too. Goodbye."
KNOWN = ["HELO x", "EHLO x", "MAIL FROM:<a@example.org>", "RCPT TO:<b@example.com>", "DATA", "RSET", "NOOP",
         "VRFY x", "HELP", "ETRN example.org", "STARTTLS", "AUTH PLAIN", "EXPN x", "FOO", "BDAT 1"]
field_names = st.text(alphabet=[chr(c) for c in range(0x21, 0x7f) if chr(c) != ":"], min_size=1, max_size=30)
rest = st.text(alphabet=string.printable.replace("\r", "").replace("\n", ""), max_size=60)


@settings(max_examples=300)
@given(name=field_names, value=rest)
def test_a_header_line_as_a_command_always_ends_the_session_with_221(name, value):
    line = f"{name}:{value}"
    d = Driver().feed(b"EHLO client.example\r\n" + line.encode() + b"\r\nNOOP\r\n")
    assert d.replies()[-1] == BYE
    assert d.closed and [e.line for e in d.of_type(NonSmtpCommand)] == [line]


@settings(max_examples=300)
@given(verb=st.sampled_from(KNOWN), case=st.booleans(), lead=st.sampled_from(["", " ", "\t", "  "]))
def test_smtp_commands_are_never_taken_for_headers(verb, case, lead):
    line = lead + (verb.lower() if case else verb)
    d = Driver().feed(line.encode() + b"\r\n")
    assert BYE not in d.replies() and not d.of_type(NonSmtpCommand)


@settings(max_examples=300)
@given(lines=st.lists(st.one_of(st.sampled_from(KNOWN), st.from_regex(r"[A-Za-z][A-Za-z0-9 ]{0,20}", fullmatch=True)),
                      max_size=15))
def test_after_a_refused_greeting_every_command_but_quit_gets_503(lines):
    refusal = Reply(554, "5.7.1", "<unknown[192.0.2.1]>: Client host rejected: Access denied")
    d = Driver(Settings(connect_check=True, hard_error_limit=1000),
               decide=lambda event: refusal if isinstance(event, Connect) else None)
    d.conn.client = "unknown[192.0.2.1]"
    d.feed(b"".join(line.encode() + b"\r\n" for line in lines) + b"QUIT\r\n")
    replies = d.replies()
    assert replies[0] == "554 5.7.1 <unknown[192.0.2.1]>: Client host rejected: Access denied"
    assert replies[-1] == "221 2.0.0 Bye"
    answered = replies[1:-1]
    assert answered == ["503 5.7.0 Error: access denied for unknown[192.0.2.1]"] * len(answered)
    assert len(answered) == len(lines) or "QUIT" in [line.split(" ")[0].upper() for line in lines]
    assert isinstance(d.events[-1], Closed)


LOCAL = rewrite.Settings(local_domains=frozenset({"mx.example"}), origin="origin.example", myhostname="mx.example")
OURS = rewrite.Settings(local_domains=frozenset({"mx.example"}), origin="mx.example", myhostname="mx.example")
atoms = st.text(alphabet=string.ascii_letters + string.digits + "!#$&'*+/=?^_`{|}~-%", min_size=1, max_size=12)
local_parts = st.lists(atoms, min_size=1, max_size=3).map(".".join)


@settings(max_examples=400)
@given(local=local_parts, settings_=st.sampled_from([LOCAL, OURS]))
def test_a_bare_name_resolves_exactly_as_the_name_at_myorigin(local, settings_):
    """A bare name gets no class its @$myorigin form would not get: relaying is
    decided on the qualified address (bang path and percent forms route on)."""
    bare = rewrite.resolve(local, settings_)
    qualified = rewrite.resolve(rewrite.canonical(local, settings_), settings_)
    assert bare == qualified
    if "!" not in local and "%" not in local:
        assert bare == rewrite.resolve(f"{local}@{settings_.origin}", settings_)


def test_canonical_follows_postfix_rewrite_tree():
    s = rewrite.Settings(local_domains=frozenset(), origin="origin.example", mydomain="example.org",
                         percent_hack=True)
    assert rewrite.canonical("user", s) == "user@origin.example"
    assert rewrite.canonical("host!user", s) == "user@host.example.org"  # bang first, then .$mydomain
    assert rewrite.canonical("user%host.example", s) == "user@host.example"
    assert rewrite.canonical("user@host", s) == "user@host.example.org"
    assert rewrite.canonical("user@[192.0.2.1]", s) == "user@[192.0.2.1]"
    assert rewrite.canonical('"a@b"', s) == '"a@b"@origin.example'
    assert rewrite.canonical("", s) == ""
    plain = rewrite.Settings(local_domains=frozenset())
    assert rewrite.canonical("user", plain) == "user" and rewrite.canonical("user@host", plain) == "user@host"
