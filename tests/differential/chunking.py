"""BDAT (RFC 3030 CHUNKING) sessions, run against both MTAs by test_sessions.py: each
reply must be Postfix's, and the messages that reach the sink must be the same bytes
(content normalised alike: dots kept, bare LF and stray CR, a last line without end).

``CHUNKS:`` sends BDAT commands with their bytes (and other commands) in one write
(harness.run_session).  What these avoid, because Postfix 3.7.11 differs from the
newer Postfix trimail follows (docs/postfix.md, "CHUNKING"): more than 1.5 times
message_size_limit of refused chunks, and a transaction after a BDAT LAST that failed
before MAIL was given again.  Lines stay under line_length_limit (Postfix counts 2
bytes more for each 2048 of a longer line).
"""

from __future__ import annotations

from tests.differential.sessions import INSIDE, OUTSIDE, Session


def headers(tag: str, to: str) -> str:
    return (f"From: Sender <a@client.test>\r\nTo: <{to}>\r\nSubject: differential {tag}\r\n"
            f"Date: Wed, 02 Dec 2026 10:00:00 +0000\r\nMessage-ID: <{tag}@client.test>\r\n")


def bdat(*chunks: str) -> str:
    """BDAT commands for *chunks* (ASCII), the last with LAST."""
    return "".join(f"BDAT {len(c)}{' LAST' if i == len(chunks) - 1 else ''}\r\n{c}" for i, c in enumerate(chunks))


ODD = "\r\n.leading dot\r\n.\r\n..two dots\r\nbare\nline feeds\n\nstray\rcarriage return\rhere\r\n"


def sessions(tag: str = "bdat", to: str = "x@far.test") -> list[Session]:
    """The sessions; *tag* starts their names and Message-IDs, *to* is their recipient."""
    start = ["EHLO client.test", "MAIL FROM:<a@client.test>", f"RCPT TO:<{to}>"]
    mail, rcpt = "MAIL FROM:<a@client.test>", f"RCPT TO:<{to}>"
    return [
        Session(f"{tag}-message-in-chunks", INSIDE, [
            *start, "CHUNKS:" + bdat(headers(f"{tag}-chunks", to), ODD[:20], ODD[20:31], ODD[31:],
                                     "last line, no end"), "QUIT"], messages=1),
        Session(f"{tag}-cr-lf-split-across-chunks", INSIDE, [
            *start, "CHUNKS:" + bdat(headers(f"{tag}-split", to) + "\r", "\nbody\r", "\n", "end\r"), "QUIT"],
            messages=1),
        Session(f"{tag}-then-data-then-bdat", INSIDE, [
            *start, "CHUNKS:" + bdat(headers(f"{tag}-first", to) + "\r\none\r\n"), mail, rcpt, "DATA",
            "DATA:" + headers(f"{tag}-second", to).replace("\r\n", "\n") + "\ntwo\n", mail, rcpt,
            "CHUNKS:" + bdat(headers(f"{tag}-third", to) + "\r\n", "three\r\n"), "QUIT"], messages=3),
        Session(f"{tag}-empty-message", INSIDE, [*start, "BDAT 0 LAST", "QUIT"], messages=1),
        Session(f"{tag}-last-in-lower-case", INSIDE, [
            *start, "CHUNKS:bdat 7 last\r\n" + "\r\nabc\r\n", "QUIT"], messages=1),
        Session(f"{tag}-before-mail-and-without-recipients", INSIDE, [
            "EHLO client.test", "CHUNKS:BDAT 3\r\nabc", mail, rcpt, "DATA", "CHUNKS:BDAT 2 LAST\r\nxy", mail,
            "CHUNKS:BDAT 4\r\nabcd", rcpt, "CHUNKS:BDAT 1 LAST\r\nz", "RSET", "QUIT"]),
        Session(f"{tag}-null-and-discarded-chunks", INSIDE, [
            *start, "CHUNKS:BDAT 0\r\nBDAT 4\r\nabcdNOOP\r\n", "DATA", "RCPT TO:<y@far.test>", mail,
            "CHUNKS:BDAT 2 LAST\r\nxy", mail, "QUIT"]),
        Session(f"{tag}-between-chunks", INSIDE, [
            *start, "CHUNKS:BDAT 5\r\nhello", "DATA", "RCPT TO:<y@far.test>", mail, "NOOP", "STARTTLS", "RSET",
            mail, rcpt, "CHUNKS:BDAT 5\r\nhelloEHLO client.test\r\nBDAT 1 LAST\r\nx", "QUIT"]),
        Session(f"{tag}-chunk-too-big", INSIDE, [
            *start, "CHUNKS:BDAT 15000\r\n" + "x" * 15000 + "BDAT 6000\r\n" + "y" * 6000 + "BDAT 3 LAST\r\nzzz",
            mail, "QUIT"]),
        Session(f"{tag}-first-chunk-too-big", INSIDE, [
            *start, "CHUNKS:BDAT 20001 LAST\r\n" + "x" * 20001 + "NOOP\r\n", "QUIT"]),
        Session(f"{tag}-chunk-ends-inside-a-line-near-the-limit", INSIDE, [
            *start, "CHUNKS:BDAT 19000\r\n" + "a\r\n" * 6000 + "b" * 1000 + "BDAT 1900 LAST\r\n" + "b" * 800
            + "\r\n" + "c" * 1098, mail, "QUIT"]),
        Session(f"{tag}-content-grows-past-the-limit", INSIDE, [
            *start, "CHUNKS:BDAT 14000\r\n" + "a\n" * 7000 + "BDAT 2 LAST\r\nzz", "RSET", "QUIT"]),
        Session(f"{tag}-refused-recipients-then-bdat", OUTSIDE, [
            "EHLO client.test", mail, "RCPT TO:<x@far.test>", "CHUNKS:BDAT 3 LAST\r\nabc", "QUIT"]),
        Session(f"{tag}-malformed", INSIDE, [*start, "BDAT 12x LAST", "NOOP"]),
        Session(f"{tag}-bad-last", INSIDE, [*start, "BDAT 1 FIRST", "NOOP"]),
        Session(f"{tag}-no-size", INSIDE, ["EHLO client.test", "BDAT", "NOOP"]),
    ]


SESSIONS = sessions()
