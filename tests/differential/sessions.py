"""The scripted sessions: each a client source address and a list of commands, run
against both MTAs (see scenario.py for who the addresses are and what the tables say).

A command ``DATA:<text>`` is message content (line ends become CRLF, the final dot is
added); ``PIPE:<a>|<b>|...`` sends several commands in one write (PIPELINING) and
reads one reply per command.
"""

from __future__ import annotations

from dataclasses import dataclass

from tests.differential.net import inside, outside

INSIDE = inside(5)
INSIDE_2 = inside(6)
INSIDE_LISTED = inside(30)
OUTSIDE = outside(5)
OUTSIDE_2 = outside(6)
OUTSIDE_3 = outside(7)
RBL_LISTED = outside(66)
NAMED = outside(77)


@dataclass
class Session:
    name: str
    source: str
    commands: list[str]
    xfail: str = ""  # a known trimail bug in smtpd.py, for the lead (strict xfail)
    messages: int = 0  # how many messages this session should bring to the sink (per MTA)


def message(tag: str, to: str = "someone@remote.test", extra: str = "", body: str = "Hello.\n") -> str:
    """Complete headers (so neither MTA adds any) with a unique Message-ID."""
    return (f"DATA:From: Sender <a@client.test>\nTo: <{to}>\nSubject: differential {tag}\n"
            f"Date: Wed, 02 Dec 2026 10:00:00 +0000\nMessage-ID: <{tag}@client.test>\n{extra}\n{body}")


def send(tag: str, sender: str, recipients: list[str], helo: str = "EHLO client.test", **kw) -> list[str]:
    return [helo, f"MAIL FROM:<{sender}>", *[f"RCPT TO:<{r}>" for r in recipients], "DATA",
            message(tag, recipients[0] if recipients else "x@remote.test", **kw), "QUIT"]


def probe(sender: str, recipients: list[str], helo: str = "HELO client.test") -> list[str]:
    """A transaction that ends before DATA (policy replies only)."""
    return [helo, f"MAIL FROM:<{sender}>", *[f"RCPT TO:<{r}>" for r in recipients], "RSET", "QUIT"]


SESSIONS: list[Session] = [
    # -- the protocol itself ---------------------------------------------------------------
    Session("helo-quit", OUTSIDE, ["HELO client.test", "QUIT"]),
    Session("ehlo-quit", OUTSIDE, ["EHLO client.test", "QUIT"]),
    Session("ehlo-twice-then-helo", OUTSIDE, ["EHLO client.test", "EHLO other.test", "HELO third.test", "QUIT"]),
    Session("noop-rset-case", OUTSIDE, ["NOOP", "noop", "RSET", "rset extra", "NOOP arg", "QUIT"]),
    Session("unknown-commands", OUTSIDE, ["FOO", "FOO bar", "HELO client.test", "BAR", "EXPN info", "HELP",
                                          "TURN", "QUIT"]),
    Session("helo-ehlo-without-domain", OUTSIDE, ["HELO", "EHLO", "HELO   ", "HELO a b", "QUIT"]),
    Session("mail-before-helo", OUTSIDE, ["MAIL FROM:<a@client.test>", "RCPT TO:<info@mx.test.example>", "RSET",
                                          "QUIT"]),
    Session("rcpt-before-mail", OUTSIDE, ["HELO client.test", "RCPT TO:<info@mx.test.example>", "DATA", "QUIT"]),
    Session("data-without-valid-rcpt", OUTSIDE, ["HELO client.test", "MAIL FROM:<a@client.test>", "DATA",
                                                 "RCPT TO:<x@far.test>", "DATA", "QUIT"]),
    Session("nested-mail", OUTSIDE, ["HELO client.test", "MAIL FROM:<a@client.test>", "MAIL FROM:<b@client.test>",
                                     "RSET", "MAIL FROM:<b@client.test>", "QUIT"]),
    Session("mail-syntax", OUTSIDE, ["HELO client.test", "MAIL", "MAIL FROM", "MAIL FROM:", "MAIL TO:<a@client.test>",
                                     "MAIL FROM:<a b@client.test>",
                                     "MAIL FROM:<<a@client.test>>", "QUIT"]),
    Session("rcpt-syntax", OUTSIDE, ["HELO client.test", "MAIL FROM:<a@client.test>", "RCPT", "RCPT TO",
                                     "RCPT TO:", "RCPT TO:<>", "RCPT FROM:<info@mx.test.example>",
                                     "RCPT TO:<info@mx.test.example>", "QUIT"]),
    Session("mail-unclosed-bracket", OUTSIDE, ["HELO client.test", "MAIL FROM:<a@client.test", "QUIT"]),
    Session("rcpt-unclosed-bracket", OUTSIDE, ["HELO client.test", "MAIL FROM:<a@client.test>",
                                               "RCPT TO:<info@mx.test.example", "QUIT"]),
    Session("mail-without-brackets", OUTSIDE, ["HELO client.test", "MAIL FROM:a@client.test",
                                               "RCPT TO:info@mx.test.example", "RSET", "MAIL FROM: <a@client.test>",
                                               "RCPT TO: <info@mx.test.example>", "QUIT"]),
    Session("mail-parameters", OUTSIDE, ["EHLO client.test", "MAIL FROM:<a@client.test> BODY=8BITMIME", "RSET",
                                         "MAIL FROM:<a@client.test> BODY=7BIT", "RSET",
                                         "MAIL FROM:<a@client.test> SIZE=abc", "MAIL FROM:<a@client.test> SIZE=100",
                                         "QUIT"]),
    Session("mail-unknown-option", OUTSIDE, ["EHLO client.test", "MAIL FROM:<a@client.test> FOO=bar",
                                             "MAIL FROM:<a@client.test> BODY=BINARY", "QUIT"]),
    Session("dsn-parameters", OUTSIDE, ["EHLO client.test", "MAIL FROM:<a@client.test> RET=HDRS ENVID=x1", "RSET",
                                        "MAIL FROM:<a@client.test>", "RCPT TO:<info@mx.test.example> NOTIFY=NEVER",
                                        "RCPT TO:<info@mx.test.example> ORCPT=rfc822;info@mx.test.example",
                                        "QUIT"]),
    Session("dsn-parameter-errors", OUTSIDE, [
        "EHLO client.test", "MAIL FROM:<a@client.test> RET=PARTIAL", "MAIL FROM:<a@client.test> RET=FULL RET=HDRS",
        "MAIL FROM:<a@client.test> ENVID=a+2", "MAIL FROM:<a@client.test> ENVID=a+0Db",
        "MAIL FROM:<a@client.test> ENVID=x ENVID=y", "MAIL FROM:<a@client.test> NOTIFY=NEVER",
        "MAIL FROM:<a@client.test> RET=hdrs ENVID=a+2Bb", "QUIT"]),
    Session("dsn-rcpt-parameter-errors", OUTSIDE, [
        "EHLO client.test", "MAIL FROM:<a@client.test>", "RCPT TO:<info@mx.test.example> NOTIFY=NEVER,SUCCESS",
        "RCPT TO:<info@mx.test.example> NOTIFY=SOMETIMES",
        "RCPT TO:<info@mx.test.example> NOTIFY=DELAY NOTIFY=FAILURE", "RCPT TO:<info@mx.test.example> ORCPT=x",
        "RCPT TO:<info@mx.test.example> ORCPT=;x", "RCPT TO:<info@mx.test.example> ORCPT=rfc822;a+4",
        "RCPT TO:<info@mx.test.example> RET=FULL",
        "RCPT TO:<info@mx.test.example> NOTIFY=success,Delay ORCPT=rfc822;info+40mx.test.example", "QUIT"]),
    Session("bdat", OUTSIDE, ["EHLO client.test", "MAIL FROM:<a@client.test>", "RCPT TO:<x@far.test>",
                              "BDAT 0 LAST", "QUIT"]),
    Session("starttls-not-offered", OUTSIDE, ["EHLO client.test", "STARTTLS", "QUIT"]),
    Session("auth-not-enabled", OUTSIDE, ["EHLO client.test", "AUTH PLAIN AGJvYgBzZWNyZXQ=", "QUIT"]),
    Session("long-command-line", OUTSIDE, ["HELO client.test", "NOOP " + "x" * 1000, "NOOP " + "y" * 3000,
                                           "QUIT"]),
    Session("size-declared-too-big", OUTSIDE, ["EHLO client.test", "MAIL FROM:<a@client.test> SIZE=30000",
                                               "MAIL FROM:<a@client.test> SIZE=20000", "QUIT"]),
    Session("smtputf8-sender", OUTSIDE, ["EHLO client.test", "MAIL FROM:<jös@client.test> SMTPUTF8",
                                         "RCPT TO:<info@mx.test.example>", "RSET", "QUIT"]),
    Session("rcpt-unknown-parameter", OUTSIDE, ["EHLO client.test", "MAIL FROM:<a@client.test>",
                                                "RCPT TO:<info@mx.test.example> FOO=bar", "QUIT"]),
    Session("quit-mid-transaction", OUTSIDE, ["HELO client.test", "MAIL FROM:<a@client.test>",
                                              "RCPT TO:<info@mx.test.example>", "QUIT"]),
    Session("header-as-command", OUTSIDE, ["HELO client.test", "Subject: hello", "NOOP"]),
    Session("http-as-command", OUTSIDE, ["GET / HTTP/1.0", "NOOP"]),
    Session("vrfy", OUTSIDE, ["HELO client.test", "VRFY", "VRFY nobody", "QUIT"]),
    Session("vrfy-known-user", OUTSIDE, ["HELO client.test", "VRFY info", "QUIT"]),
    Session("etrn", OUTSIDE, ["ETRN relay.test", "HELO client.test", "ETRN", "ETRN far.test", "QUIT"]),
    Session("too-many-recipients", INSIDE,
            ["HELO client.test", "MAIL FROM:<a@client.test>", *[f"RCPT TO:<r{i}@far.test>" for i in range(12)],
             "RSET", "QUIT"]),
    Session("empty-line", OUTSIDE, ["", "HELO client.test", "", "QUIT"]),
    # -- relay control -------------------------------------------------------------------------
    Session("outside-cannot-relay", OUTSIDE, probe("a@client.test", ["x@far.test", "y@remote.test"])),
    Session("outside-percent-hack", OUTSIDE, probe("a@client.test", ["x%far.test@mx.test.example",
                                                                    "x@far.test@mx.test.example"])),
    Session("outside-bang-path", OUTSIDE, probe("a@client.test", ["far.test!x@mx.test.example",
                                                                 "@mx.test.example:x@far.test"])),
    Session("outside-relay-domain", OUTSIDE, probe("a@client.test", ["user@relay.test", "nobody@relay.test",
                                                                    "USER@RELAY.TEST"])),
    Session("inside-may-relay", INSIDE, send("inside-relay", "a@client.test", ["x@far.test", "y@far.test"]),
            messages=1),
    Session("inside-second-address", INSIDE_2, probe("b@client.test", ["x@far.test", "x@nxdomain.test"])),
    Session("inside-access-listed", INSIDE_LISTED, probe("a@client.test", ["x@far.test", "info@mx.test.example"])),
    Session("outside-to-relay-domain-delivered", OUTSIDE_2, send("relay-domain", "a@client.test",
                                                                 ["user@relay.test", "other@relay.test"]),
            messages=1),
    # -- local recipients, aliases, virtual ---------------------------------------------------------
    Session("local-unknown-user", OUTSIDE, probe("a@client.test", ["nobody@mx.test.example", "info@mx.test.example",
                                                                  "nobody@localhost"])),
    Session("alias-one-target", OUTSIDE, send("alias-info", "a@client.test", ["info@mx.test.example"]), messages=1),
    Session("alias-list", OUTSIDE_2, send("alias-team", "a@client.test", ["team@mx.test.example"]), messages=1),
    Session("alias-chain", OUTSIDE_3, send("alias-abuse", "a@client.test", ["abuse@mx.test.example"]), messages=1),
    Session("alias-at-localhost", OUTSIDE, send("alias-localhost", "a@client.test", ["info@localhost"]),
            messages=1),
    Session("alias-mixed-case", OUTSIDE, send("alias-case", "a@client.test", ["INFO@MX.TEST.EXAMPLE"]), messages=1),
    Session("postmaster-forms", OUTSIDE, probe("a@client.test", ["postmaster", "Postmaster@mx.test.example",
                                                                "POSTMASTER@localhost", "postmaster@far.test"])),
    Session("virtual-alias", OUTSIDE, send("virtual", "a@client.test", ["sales@virtual.test"]), messages=1),
    Session("virtual-to-local-alias", OUTSIDE_2, send("virtual-local", "a@client.test", ["help@virtual.test"]),
            messages=1),
    Session("virtual-unknown", OUTSIDE, probe("a@client.test", ["nobody@virtual.test", "sales@virtual.test"])),
    Session("unqualified-recipient", OUTSIDE, probe("a@client.test", ["info", "nobody"])),
    Session("unqualified-sender", OUTSIDE, send("unqualified-sender", "someone", ["info@mx.test.example"]),
            messages=1),
    # -- address syntax checks -------------------------------------------------------------------------
    Session("non-fqdn-recipient", INSIDE, probe("a@client.test", ["x@far", f"x@[{outside(1)}]", "x@far."])),
    Session("non-fqdn-sender", OUTSIDE, probe("a@client", ["info@mx.test.example"])),
    Session("unknown-sender-domain", OUTSIDE, probe("a@nxdomain.test", ["info@mx.test.example"])),
    Session("servfail-sender-domain", OUTSIDE, probe("a@servfail.test", ["info@mx.test.example"])),
    Session("unknown-recipient-domain", INSIDE, probe("a@client.test", ["x@nxdomain.test", "x@servfail.test"])),
    Session("null-sender", OUTSIDE, send("null-sender", "", ["info@mx.test.example"]), messages=1),
    # -- access tables -------------------------------------------------------------------------------------
    Session("sender-access-reject", OUTSIDE, probe("spammer@client.test", ["info@mx.test.example"])),
    Session("sender-access-domain", OUTSIDE, probe("x@badsender.test", ["info@mx.test.example"])),
    Session("sender-access-ok-skips-domain-check", OUTSIDE, probe("friend@client.test", ["info@mx.test.example"])),
    Session("sender-access-temporary", OUTSIDE, probe("later@client.test", ["info@mx.test.example"])),
    Session("sender-access-discard", OUTSIDE, send("discard", "disc@client.test", ["info@mx.test.example"])),
    Session("sender-access-hold", OUTSIDE, send("hold", "hold@client.test", ["info@mx.test.example"])),
    Session("recipient-access", INSIDE, probe("a@client.test", ["blocked@relay.test", "closed@remote.test",
                                                               "user@relay.test"])),
    Session("client-reject", outside(20), probe("a@client.test", ["info@mx.test.example"])),
    Session("client-reject-custom-code", outside(21), probe("a@client.test", ["info@mx.test.example"])),
    Session("client-ok-still-no-relay", outside(22), probe("a@client.test", ["x@far.test",
                                                                              "info@mx.test.example"])),
    Session("client-discard", outside(23), send("client-discard", "a@client.test", ["info@mx.test.example"])),
    Session("client-hold", outside(24), send("client-hold", "a@client.test", ["info@mx.test.example"])),
    Session("client-temporary", outside(25), probe("a@client.test", ["info@mx.test.example"])),
    Session("client-defer-if-permit", outside(26), probe("a@client.test", ["info@mx.test.example",
                                                                            "x@far.test"])),
    Session("client-reject-with-text", outside(27), probe("a@client.test", ["info@mx.test.example"])),
    Session("helo-access-reject", OUTSIDE, probe("a@client.test", ["info@mx.test.example"],
                                                 helo="HELO bad.helo.test")),
    Session("helo-access-custom", OUTSIDE, probe("a@client.test", ["info@mx.test.example"],
                                                 helo="EHLO spam.helo.test")),
    Session("helo-access-ok", OUTSIDE, probe("a@client.test", ["x@far.test"], helo="HELO ok.helo.test")),
    # -- DNS lists and client names --------------------------------------------------------------------
    Session("rbl-listed-client", RBL_LISTED, probe("a@client.test", ["info@mx.test.example"])),
    Session("rbl-listed-client-to-postmaster", RBL_LISTED, probe("a@client.test", ["postmaster@mx.test.example"])),
    Session("rhsbl-sender", OUTSIDE, probe("a@spam.test", ["info@mx.test.example"])),
    Session("named-client-relay-denied", NAMED, probe("a@client.test", ["x@far.test"])),
    Session("named-client-delivers", NAMED, send("named-client", "a@client.test", ["info@mx.test.example"]),
            messages=1),
    # -- message content ---------------------------------------------------------------------------------
    Session("content-dot-stuffing", INSIDE, [
        "EHLO client.test", "MAIL FROM:<a@client.test>", "RCPT TO:<dots@far.test>", "DATA",
        message("dots", "dots@far.test", body="..leading dot\n.\tdot tab\nplain\n...\n"), "QUIT"], messages=1),
    Session("content-8bit", INSIDE, [
        "EHLO client.test", "MAIL FROM:<a@client.test> BODY=8BITMIME", "RCPT TO:<eight@far.test>", "DATA",
        message("8bit", "eight@far.test", extra="MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n"
                "Content-Transfer-Encoding: 8bit\n", body="Grüße aus Köln\n"), "QUIT"], messages=1),
    Session("content-missing-headers", INSIDE, [
        "HELO client.test", "MAIL FROM:<a@client.test>", "RCPT TO:<bare@far.test>", "DATA",
        "DATA:Subject: differential bare\n\nno From, Date or Message-ID\n", "QUIT"], messages=1),
    Session("content-too-big", INSIDE, [
        "HELO client.test", "MAIL FROM:<a@client.test>", "RCPT TO:<big@far.test>", "DATA",
        message("too-big", "big@far.test", body=("x" * 76 + "\n") * 300), "NOOP", "QUIT"]),
    Session("content-folded-headers", INSIDE, [
        "HELO client.test", "MAIL FROM:<a@client.test>", "RCPT TO:<folded@far.test>", "DATA",
        message("folded", "folded@far.test", extra="X-Long: first part\n\tsecond part\n  third part\n"), "QUIT"],
        messages=1),
    Session("two-transactions", INSIDE, [
        "EHLO client.test", "MAIL FROM:<a@client.test>", "RCPT TO:<one@far.test>", "DATA",
        message("first-of-two", "one@far.test"), "MAIL FROM:<b@client.test>", "RCPT TO:<two@far.test>", "DATA",
        message("second-of-two", "two@far.test"), "QUIT"], messages=2),
    Session("rset-after-data", INSIDE, [
        "HELO client.test", "MAIL FROM:<a@client.test>", "RCPT TO:<r@far.test>", "DATA",
        message("rset-after", "r@far.test"), "RSET", "RCPT TO:<r@far.test>", "QUIT"], messages=1),
    Session("pipelined-transaction", OUTSIDE, [
        "EHLO client.test",
        "PIPE:MAIL FROM:<a@client.test>|RCPT TO:<info@mx.test.example>|RCPT TO:<x@far.test>|DATA",
        message("pipelined"), "QUIT"], messages=1),
    Session("pipelined-quit", OUTSIDE, ["PIPE:HELO client.test|NOOP|QUIT"]),
    Session("lower-case-verbs", OUTSIDE, ["ehlo client.test", "mail from:<a@client.test>",
                                          "rcpt to:<info@mx.test.example>", "rset", "quit"]),
    Session("quoted-local-part", INSIDE, probe("a@client.test", ['"john doe"@far.test', '"info"@mx.test.example',
                                                                "x@FAR.TEST."])),
    Session("address-literal-recipient", OUTSIDE, probe("a@client.test", [f"info@[{outside(1)}]",
                                                                         f"info@[{outside(1)}]."])),
    Session("smtputf8-recipient", OUTSIDE, ["EHLO client.test", "MAIL FROM:<a@client.test>",
                                            "RCPT TO:<jürgen@relay.test>", "RSET",
                                            "MAIL FROM:<a@client.test> SMTPUTF8", "RCPT TO:<jürgen@relay.test>",
                                            "QUIT"]),
    Session("null-sender-two-recipients", OUTSIDE, probe("", ["info@mx.test.example", "team@mx.test.example"])),
    Session("rset-then-new-transaction", OUTSIDE_2, [
        "EHLO client.test", "MAIL FROM:<a@client.test>", "RCPT TO:<x@far.test>", "RSET",
        "MAIL FROM:<b@client.test>", "RCPT TO:<info@mx.test.example>", "DATA", message("after-rset"), "QUIT"],
        messages=1),
    Session("inside-unknown-local-user", INSIDE, probe("a@client.test", ["nobody@mx.test.example",
                                                                        "nobody@virtual.test"])),
    Session("named-client-inside-access", NAMED, probe("friend@client.test", ["x@far.test",
                                                                             "info@mx.test.example"])),
    Session("mixed-recipients", OUTSIDE_3, send("mixed", "a@client.test",
                                                ["info@mx.test.example", "x@far.test", "nobody@mx.test.example",
                                                 "sales@virtual.test", "user@relay.test"]), messages=1),
]
