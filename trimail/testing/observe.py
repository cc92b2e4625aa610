"""What the test MTA saw, for tests that assert on behaviour rather than on mail:
every SMTP session (``Attempt``: the client, its HELO name, each command with the
reply it got, how it ended; refused sessions too) and, in relay mode, every
delivery outcome (``Delivery``: recipient, sent/deferred/bounced, the remote reply).

``Attempt`` reads the session from its bytes as they pass (the server's plaintext
side, so after STARTTLS too): lines the client sent are commands, paired in order
with the replies the server sent (PIPELINING keeps them in order); after a ``354``
the client's bytes are message content up to ``CRLF.CRLF``, shown as the command
``.``; the bytes a ``BDAT <size>`` announces are content too, whatever its reply.  AUTH arguments and SASL responses are never kept (``AUTH PLAIN ***``).
Sans-IO: nothing here touches a socket.
"""

from __future__ import annotations

import dataclasses
from collections import deque

_END_OF_DATA = b"\r\n.\r\n"
LINE_LIMIT = 1000  # characters of a command or reply line kept


@dataclasses.dataclass(frozen=True, slots=True)
class Exchange:
    """One command and the reply it got (``command`` None: the greeting, or a reply the
    server sent on its own, such as a 421 at a timeout)."""

    command: str | None
    code: int
    text: str  # the reply's lines joined with newlines, codes stripped: "2.0.0 Ok: queued as 4Y2..."

    @property
    def verb(self) -> str | None:
        return None if self.command is None else self.command.split(" ", 1)[0].upper()

    def __str__(self) -> str:
        return f"{self.command or '(greeting)'} -> {self.code} {self.text}".replace("\n", " ")


@dataclasses.dataclass(slots=True)
class Attempt:
    """One SMTP session, from connect to close."""

    client_address: str
    helo: str = ""
    exchanges: list[Exchange] = dataclasses.field(default_factory=list)
    # None while it goes on; then "quit", "client disconnected", "dropped (fault)", "TLS handshake failed",
    # "closed by the server: 421 ...", "rejected at connect: 554 ..."
    ended: str | None = None
    tls: bool = False  # STARTTLS (or implicit TLS) succeeded
    message_bytes: int = 0  # content bytes of the current (or last) message
    _in: bytearray = dataclasses.field(default_factory=bytearray, repr=False)
    _out: bytearray = dataclasses.field(default_factory=bytearray, repr=False)
    _reply_lines: list[str] = dataclasses.field(default_factory=list, repr=False)
    _pending: deque[str] = dataclasses.field(default_factory=deque, repr=False)
    _in_data: bool = False
    _before: bytes = b"\r\n"  # the last two bytes before _in (the terminator needs its CRLF)
    _waiting_data_reply: bool = False  # DATA sent: what follows waits for its 354 (or refusal)
    _chunk: int = 0  # bytes of a BDAT chunk still to come (the server reads them, taken or not)
    _bdat_first: bool = True  # the next BDAT begins a message

    # -- reading ----------------------------------------------------------------

    @property
    def commands(self) -> list[str]:
        return [e.command for e in self.exchanges if e.command is not None]

    @property
    def replies(self) -> list[int]:
        """Every reply code in order, the greeting's first."""
        return [e.code for e in self.exchanges]

    @property
    def greeting(self) -> Exchange | None:
        return self.exchanges[0] if self.exchanges and self.exchanges[0].command is None else None

    def reply_to(self, verb: str) -> Exchange | None:
        """The last exchange whose command starts with *verb* (``"MAIL"``, ``"."``)."""
        for exchange in reversed(self.exchanges):
            if exchange.verb == verb.upper():
                return exchange
        return None

    @property
    def in_data(self) -> bool:
        return self._in_data

    @property
    def content_received(self) -> int:
        """Content bytes of the current (or last) message received so far."""
        return self.message_bytes + (len(self._in) if self._in_data else 0)

    def __str__(self) -> str:
        said = ", ".join(f"{e.verb or 'greeting'} {e.code}" for e in self.exchanges)
        helo = f" helo=<{self.helo}>" if self.helo else ""
        return f"[{self.client_address}]{helo}: {said or '(nothing)'}; {self.ended or 'in progress'}"

    # -- feeding (the test MTA's session hooks) ------------------------------------

    def received(self, data: bytes) -> None:
        """Bytes the client sent (b"" at its end of file)."""
        self._in += data
        while self._in and not self._waiting_data_reply:
            if self._in_data:
                # the two bytes before: the content starts just after DATA's CRLF, which counts
                at = (self._before + bytes(self._in)).find(_END_OF_DATA)
                if at < 0:
                    taken = max(0, len(self._in) - 3)  # keep what may start a terminator split across reads
                    self.message_bytes += taken
                    self._before = (self._before + bytes(self._in[:taken]))[-2:]
                    del self._in[:taken]
                    return
                self.message_bytes += at
                del self._in[:at + 3]  # the content, then ".\r\n" (its CRLF was the content's last)
                self._in_data = False
                self._pending.append(".")
                continue
            if self._chunk:
                taken = min(self._chunk, len(self._in))
                self._chunk -= taken
                self.message_bytes += taken
                del self._in[:taken]
                continue
            end = self._in.find(b"\n")
            if end < 0:
                return
            line = bytes(self._in[:end]).rstrip(b"\r").decode("utf-8", "replace")[:LINE_LIMIT]
            del self._in[:end + 1]
            self._command(line)

    def _command(self, line: str) -> None:
        if self.exchanges and self.exchanges[-1].code == 334 and not self._pending:
            self._pending.append("(SASL response)")  # credentials: never kept
            return
        verb, _, argument = line.partition(" ")
        verb = verb.upper()
        if verb == "AUTH":
            mechanism = argument.split(" ", 1)[0]
            line = f"AUTH {mechanism}" + (" ***" if " " in argument.strip() else "")
        elif verb in ("HELO", "EHLO"):
            self.helo = argument.strip()
        self._pending.append(line)
        if verb == "DATA":
            self._waiting_data_reply = True
        elif verb == "BDAT":
            size = argument.split()[:1]
            if size and size[0].isascii() and size[0].isdigit():  # (a malformed BDAT ends the session)
                if self._bdat_first:
                    self.message_bytes = 0
                self._chunk = int(size[0])
                self._bdat_first = "LAST" in argument.upper()

    def sent(self, data: bytes) -> None:
        """Bytes the server sent."""
        out = self._out
        out += data
        if b"\n" not in data:  # no line ended (a line's end is in the bytes that end it)
            return
        *lines, rest = out.split(b"\n")
        del out[:len(out) - len(rest)]
        for raw in lines:
            line = raw.rstrip(b"\r").decode("utf-8", "replace")
            self._reply_lines.append(line[4:4 + LINE_LIMIT])
            if line[3:4] == "-":
                continue
            code = int(line[:3]) if line[:3].isdigit() else 0
            command = self._pending.popleft() if self._pending else None
            self.exchanges.append(Exchange(command, code, "\n".join(self._reply_lines)))
            self._reply_lines = []
            verb = command.upper() if command is not None else None
            if verb == "DATA":
                self._waiting_data_reply = False
                self._in_data = code == 354
                self.message_bytes = 0
                self._before = b"\r\n"
            elif verb == "STARTTLS" and code == 220:
                self._pending.clear()  # anything sent with it in plaintext is discarded (RFC 3207)
                self._in.clear()
        if not self._waiting_data_reply and self._in:
            self.received(b"")

    def end(self, *, dropped: bool, tls: bool) -> None:
        """The session is over; *dropped*: a fault closed it; *tls*: it was encrypted."""
        self.tls = tls
        last = self.exchanges[-1] if self.exchanges else None
        started_tls = any(e.verb == "STARTTLS" and e.code == 220 for e in self.exchanges)
        if dropped:
            self.ended = "dropped (fault)"
        elif last is not None and last.verb == "QUIT":
            self.ended = "quit"
        elif started_tls and not tls:
            self.ended = "TLS handshake failed"
        elif last is not None and last.code == 421:
            self.ended = f"closed by the server: {last.code} {last.text}".replace("\n", " ")
        elif last is not None and last.command is None and last.code >= 400:
            self.ended = f"rejected at connect: {last.code} {last.text}".replace("\n", " ")
        else:
            self.ended = "client disconnected"


@dataclasses.dataclass(frozen=True, slots=True)
class Delivery:
    """One delivery outcome for one recipient (relay mode), as the queue records it."""

    queue_id: str
    recipient: str
    status: str  # "sent", "deferred" or "bounced"
    dsn: str  # RFC 3463 status: "2.0.0", "4.4.1", "5.1.1", ...
    reply: str  # the remote reply or the reason, as in the log's (...) part
    relay: str  # "host[address]:port", or "none"

    def __str__(self) -> str:
        return f"{self.queue_id}: to=<{self.recipient}>, relay={self.relay}, dsn={self.dsn}, " \
               f"status={self.status} ({self.reply})"
