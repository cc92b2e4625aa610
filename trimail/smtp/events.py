"""The events of the SMTP server machine (``trimail.smtp.server``), as h11 has them.

``next_event()`` returns one of these, or ``NEED_DATA`` when it needs more bytes.
An event with ``needs_reply`` is a decision: the caller answers it with
``respond()`` before asking for the next event, so pipelined commands are decided
strictly in order.  The others report what happened (for the queue and the log).
Events are plain values: no I/O, no reference to the machine.
"""

from __future__ import annotations

import dataclasses

from trimail.smtp.replies import Reply
from trimail.smtp.sasl import Credentials


class NeedData:
    """The type of ``NEED_DATA``: feed more bytes with receive_data(), then ask again."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()


class Event:
    """Base of all events; ``needs_reply`` events must be answered by respond()."""

    needs_reply = False


@dataclasses.dataclass(slots=True)
class Hello(Event):
    name: str
    extended: bool
    needs_reply = True


@dataclasses.dataclass(slots=True)
class MailFrom(Event):
    sender: str
    params: dict[str, str | None]
    needs_reply = True


@dataclasses.dataclass(slots=True)
class RcptTo(Event):
    recipient: str
    params: dict[str, str | None]
    needs_reply = True


@dataclasses.dataclass(slots=True)
class DataStart(Event):
    needs_reply = True


@dataclasses.dataclass(slots=True)
class BdatStart(Event):
    """The first BDAT chunk of a transaction (RFC 3030), decided as DATA is: None (or any
    positive reply) takes the chunk, whose content then comes as ``DataChunk`` events
    and ends with ``ChunkEnd`` or, after LAST, ``DataEnd``; an error reply is sent after
    the chunk has been read and dropped (Postfix's skip_bdat)."""

    size: int  # the chunk's size as declared
    last: bool
    needs_reply = True


@dataclasses.dataclass(slots=True)
class ChunkEnd(Event):
    """A BDAT chunk other than the last was read: None answers ``250 2.0.0 Ok: N bytes``;
    an error reply (the content could not be stored) makes the message void, and the
    chunks that follow are dropped until BDAT LAST or RSET."""

    size: int  # the chunk's size as declared
    needs_reply = True


@dataclasses.dataclass(slots=True)
class DataChunk(Event):
    data: bytes


@dataclasses.dataclass(slots=True)
class DataEnd(Event):
    """The message is complete; answer with the reply for its fate (e.g. queued).  After
    BDAT LAST the machine sends ``Ok: queued as ID`` as Postfix does then: ``Ok: N
    bytes queued as ID``."""

    size: int
    needs_reply = True


@dataclasses.dataclass(slots=True)
class DataAborted(Event):
    """The message is void (too big, bare LF, connection lost): discard it."""

    reason: str


@dataclasses.dataclass(slots=True)
class StartTls(Event):
    """The client asked for TLS.  Answer 220 to proceed: the machine then forgets
    every byte received so far and the HELO name, and returns to the state before
    EHLO (RFC 3207 4.2): MAIL is refused ``503 5.5.1`` until the client says EHLO
    again; the caller does the handshake after sending the reply and forgets its
    own copy of the session's HELO state too."""

    needs_reply = True


@dataclasses.dataclass(slots=True)
class Auth(Event):
    """Credentials from AUTH; answer 235 (success) or 535 (failure)."""

    mechanism: str
    credentials: Credentials
    needs_reply = True


@dataclasses.dataclass(slots=True)
class Etrn(Event):
    """ETRN site (RFC 1985): the caller decides whether the site's mail may be
    flushed; None answers ``250 Queuing started``."""

    site: str
    needs_reply = True


@dataclasses.dataclass(slots=True)
class Reset(Event):
    """The mail transaction was cleared (RSET, EHLO/HELO, or a failed DATA)."""


@dataclasses.dataclass(slots=True)
class Connect(Event):
    """A client connected (only with ``Settings.connect_check``): answer None for the
    220 banner, or the client restrictions' reply (Postfix's smtpd_delay_reject = no)."""

    needs_reply = True


@dataclasses.dataclass(slots=True)
class NonSmtpCommand(Event):
    """The client sent a header or a forbidden command as a command line; it was
    answered 221 and the session ends (Postfix logs ``warning: non-SMTP command``)."""

    line: str


@dataclasses.dataclass(slots=True)
class Rejected(Event):
    """The machine itself answered a command with an error reply (for the log)."""

    command: str
    reply: Reply
    sender: str | None = None  # MAIL refused for its SIZE: Postfix logs it as a policy reject


@dataclasses.dataclass(slots=True)
class Closed(Event):
    """The session is over; send what data_to_send() returns, then close."""

    reason: str
