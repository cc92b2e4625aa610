"""The SMTP server's states and the one table of legal moves between them (h11's _state.py).

``TRANSITIONS[state][trigger]`` is the state after *trigger* in *state*; a trigger
is the event class that reports the move (``Hello``, ``MailFrom``, ``DataEnd``...)
or, for the few moves no event reports, one of the names below.  ``advance()`` is
the only way the machine (``trimail.smtp.server``) changes its state: a move the
table does not list raises ``LocalProtocolError``, a bug in the machine or its
caller, never a silent reset.  The peer cannot cause one: what a client may send in
a state is checked against the same table first and refused with an SMTP reply.

The table is data the command reader consults too (is ``MAIL`` legal here?), so
the sequence rules of RFC 5321 4.1.4 are written once.  What it does not say:
policy (``smtpd_helo_required``, MAIL before a new EHLO after STARTTLS) is the
machine's, which refuses such a command before any move; so is BDAT's mode (Postfix's
bdat_state: chunks taken, or dropped after an error), a flag beside the state: between
chunks the state is RCPT, and MAIL, RCPT and DATA are refused while the flag is up.

Performance: a move is two dictionary lookups, no allocation.
"""

from __future__ import annotations

import enum

from trimail.smtp.events import (
    Auth,
    BdatStart,
    ChunkEnd,
    Closed,
    DataAborted,
    DataEnd,
    DataStart,
    Event,
    Hello,
    MailFrom,
    RcptTo,
    Reset,
    StartTls,
)


class LocalProtocolError(Exception):
    """The caller used the machine wrongly (a bug), as opposed to a peer error."""


class State(enum.Enum):
    GREETING = "greeting"  # before greet()
    INIT = "init"  # greeted, no HELO/EHLO yet
    READY = "ready"  # HELO/EHLO done (or a transaction ended), no transaction
    MAIL = "mail"  # MAIL accepted, no recipient yet
    RCPT = "rcpt"  # at least one recipient accepted
    DATA = "data"  # reading message content
    BDAT = "bdat"  # reading the content of a BDAT chunk (between chunks: RCPT)
    AUTH = "auth"  # reading SASL responses
    CLOSED = "closed"


# moves that no event reports
GREET = "greet"  # the 220 banner is queued, or the Connect decision (smtpd_delay_reject = no)
AUTH_START = "auth start"  # AUTH named a mechanism: SASL response lines follow
AUTH_END = "auth end"  # the client aborted the exchange with "*" or sent a malformed response
RESET_BEFORE_HELO = "reset before helo"  # RSET, or a transaction's end, with no HELO/EHLO name yet
NEXT_CHUNK = "next chunk"  # a BDAT after the first of its message: no decision, its content follows

Trigger = type[Event] | str

_COMMANDS = (State.INIT, State.READY, State.MAIL, State.RCPT)  # the states that read commands

TRANSITIONS: dict[State, dict[Trigger, State]] = {
    State.GREETING: {GREET: State.INIT},
    State.INIT: {Hello: State.READY, MailFrom: State.MAIL, StartTls: State.INIT},
    State.READY: {Hello: State.READY, MailFrom: State.MAIL, StartTls: State.INIT, AUTH_START: State.AUTH},
    State.MAIL: {Hello: State.READY, RcptTo: State.RCPT},
    State.RCPT: {Hello: State.READY, RcptTo: State.RCPT, DataStart: State.DATA,
                 BdatStart: State.BDAT, NEXT_CHUNK: State.BDAT},
    # DataEnd: accepted or refused; DataAborted: read to its end, then refused (too big, bare LF)
    State.DATA: {DataEnd: State.READY, DataAborted: State.READY},
    # ChunkEnd: a chunk before LAST taken, the next BDAT (or RSET...) is read in RCPT
    State.BDAT: {ChunkEnd: State.RCPT, DataEnd: State.READY, DataAborted: State.READY},
    State.AUTH: {Auth: State.READY, AUTH_END: State.READY},
    State.CLOSED: {},
}
for _state in _COMMANDS:
    if _state is not State.INIT:  # INIT has no HELO name: RSET there stays before HELO
        TRANSITIONS[_state][Reset] = State.READY
    TRANSITIONS[_state][RESET_BEFORE_HELO] = State.INIT
for _state in State:
    if _state is not State.CLOSED:
        TRANSITIONS[_state][Closed] = State.CLOSED
del _state


def advance(state: State, trigger: Trigger) -> State:
    """The state after *trigger* in *state*; LocalProtocolError if the table has no such move."""
    try:
        return TRANSITIONS[state][trigger]
    except KeyError:
        name = trigger if isinstance(trigger, str) else trigger.__name__
        raise LocalProtocolError(f"no move from {state.name} on {name}") from None
