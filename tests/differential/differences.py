"""The deliberate differences: each one a row of the table "## Deliberate differences"
in docs/postfix.md (its first column holds the key in backquotes), and a test that
says which reply pairs it explains.  A pair that neither matches nor is explained here
fails the suite.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Difference:
    key: str
    explains: Callable[[str, list[str], list[str]], bool]  # (command, Postfix's reply, trimail's)


def _verb(command: str) -> str:
    return command.split(" ", 1)[0].upper()


NOT_RECOGNIZED = ["500 5.5.2 Error: command not recognized"]

DIFFERENCES = [
    # VRFY never confirms or denies a user (nor runs the recipient restrictions)
    Difference("vrfy", lambda c, p, t: _verb(c) == "VRFY" and " " in c.strip()
               and t == ["252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery"]),
    Difference("help", lambda c, p, t: _verb(c) == "HELP" and p == NOT_RECOGNIZED and t[-1].startswith("214 ")),
    Difference("expn-turn-502", lambda c, p, t: _verb(c) in ("EXPN", "TURN") and p == NOT_RECOGNIZED
               and t == ["502 5.5.1 Error: command not implemented"]),
    # UTF-8 in an address only in an SMTPUTF8 transaction (Postfix with strict_smtputf8 = yes)
    Difference("strict-smtputf8", lambda c, p, t: _verb(c) in ("MAIL", "RCPT") and not c.isascii()
               and "SMTPUTF8" not in c.upper() and t == ["553 5.6.7 Must declare SMTPUTF8 to send unicode address"]),
    # a command line over 2048 bytes is refused (bounded buffers), Postfix reads on and ignores the rest
    Difference("command-line-length", lambda c, p, t: len(c) > 2048 and t == ["500 5.5.2 Error: line too long"]),
    # allow_percent_hack = no by default: user%far@local is a local name, unknown here
    Difference("percent-hack", lambda c, p, t: "%" in c and p[0].endswith("Relay access denied")
               and "User unknown in local recipient table" in t[0]),
    # a path with two '@', doubled brackets or a dot after an address literal is a syntax error
    Difference("strict-path-syntax", lambda c, p, t: _verb(c) in ("MAIL", "RCPT")
               and (c.count("@") > 1 or "<<" in c or "]." in c) and t[0].startswith("501 5.")),
]


def explain(command: str, postfix: list[str], trimail: list[str]) -> str | None:
    """The key of the difference that explains this pair, or None."""
    for difference in DIFFERENCES:
        if difference.explains(command or "", postfix, trimail):
            return difference.key
    return None
