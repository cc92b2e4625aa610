"""BDAT (RFC 3030 CHUNKING, without BINARYMIME) for the SMTP server machine, as
Postfix's smtpd has it (bdat_cmd, skip_bdat; Postfix 3.4 and later).

``BDAT <size> [LAST]`` is followed by exactly *size* raw bytes of content: no dot
and no end marker.  ``BdatReader`` is the part of ``ServerConnection``
(``trimail.smtp.server``) that reads it: the command, then the bytes ("read exactly
N raw bytes", ``_read_raw``), and it gives the content as the same events DATA gives
(``DataChunk``, then ``DataEnd`` after LAST), so everything after them is shared.
The first BDAT of a transaction is decided as DATA is (``BdatStart``: restrictions,
filters); each chunk before LAST is answered ``250 2.0.0 Ok: <size> bytes`` after a
``ChunkEnd`` decision, and the message's end ``250 2.0.0 Ok: <N> bytes queued as
<ID>`` (N: the content's size).

Postfix's replies and order of checks: CHUNKING discarded (smtpd_discard_ehlo_keywords)
``521 5.5.1``, a malformed command ``521 5.5.4 Syntax: BDAT count [LAST]`` (both end
the session: the bytes that follow would be read as commands); ``BDAT 0`` without
LAST ``551 5.7.1 Null BDAT request``; no MAIL ``503 5.5.1 Error: need RCPT command``,
no recipient ``554 5.5.1 Error: no valid recipients``; a chunk that would take the
message past message_size_limit ``552 5.3.4 Chunk exceeds message size limit``.  A
refused BDAT is answered only after its bytes were read and dropped, so the session
stays in step; after one, every BDAT is dropped (``551 5.0.0 Discarded N bytes after
earlier error``) and MAIL, RCPT and DATA are refused (``503 5.5.1 Error: MAIL after
BDAT``...) until BDAT LAST, RSET or HELO/EHLO.  As Postfix 3.11.4 and later, bytes
are dropped only up to 1.5 times message_size_limit: past that the refusal is sent
at once and the session ends (Postfix stops reading).  A BDAT LAST that fails resets
the whole transaction (Postfix 3.11.6 and 3.7.22; older releases kept the recipients).

Content: never dot-unstuffed, and its line ends are normalised as DATA's are
(``trimail.smtp.dotreader``): a bare LF ends a line as CRLF would (or, with
``reject_bare_lf``, makes the message void: ``<code> 5.5.2 ... bare <LF> received``
after the chunk), every other CR becomes a space (cleanup_replace_stray_cr_lf), and
a last line without an end gets CRLF, as Postfix stores it.  A CR that ends a chunk
is held until the next byte says whether an LF follows (possibly in the next chunk),
so where the client cuts its chunks never changes the content.  The content's size
counts toward message_size_limit as Postfix counts it (``counted``): a line when it
ends, a longer line in whole pieces of line_length_limit (``552 5.3.4 Error: message
file too big`` after the chunk), so a chunk that ends inside a line is measured as
Postfix measures it; Postfix's 2 more bytes per piece of a long line are not added.

Parameters (through ``Settings``): message_size_limit, smtpd_forbid_bare_newline,
smtpd_forbid_bare_newline_reject_code, cleanup_replace_stray_cr_lf,
smtpd_discard_ehlo_keywords (``chunking``).

Security notes: a chunk of any declared size is read in pieces of at most ``PIECE``
bytes, each passed on at once: nothing here grows with it.  The caller reads only
on NEED_DATA, each read bounded by smtpd_timeout.  Sizes above 2**63 - 1 are
malformed (Postfix's off_t).  Nothing here runs for DATA: the DATA reader is
untouched, and the command reader checks one flag for MAIL, RCPT and DATA.
"""

from __future__ import annotations

import dataclasses

from trimail.smtp import replies
from trimail.smtp.content import BARE_LF, replace_stray_cr
from trimail.smtp.events import (
    BdatStart,
    ChunkEnd,
    DataAborted,
    DataChunk,
    DataEnd,
    Event,
    Reset,
)
from trimail.smtp.reader import CommandReader
from trimail.smtp.replies import Reply
from trimail.smtp.states import (
    NEXT_CHUNK,
    RESET_BEFORE_HELO,
    LocalProtocolError,
    State,
    Trigger,
    advance,
)

PIECE = 64 * 1024  # most content bytes taken from the input at a time
OFF_T_MAX = 2**63 - 1
BDAT_OK = 1  # Postfix's SMTPD_BDAT_STAT_OK: chunks are taken
BDAT_ERROR = 2  # SMTPD_BDAT_STAT_ERROR: chunks are dropped until LAST or RSET


# Postfix's warnings for these refusals ({} is the client), for the caller's log
WARNINGS = {replies.SYNTAX_BDAT: "malformed BDAT command syntax from {}", replies.NULL_BDAT: "null BDAT request from {}",
            replies.CHUNK_TOO_BIG: "BDAT request from {} exceeds message size limit"}


@dataclasses.dataclass(slots=True)
class ChunkReader:
    """The content of one message's chunks, normalised; ``start()`` each chunk."""

    size_limit: int = 0  # message_size_limit, 0: none
    reject_bare_lf: bool = False  # smtpd_forbid_bare_newline = reject
    replace_stray: bool = True  # cleanup_replace_stray_cr_lf
    line_limit: int = 2048  # line_length_limit: a longer line counts in pieces of this size
    declared: int = 0  # the current chunk's size
    remaining: int = 0  # bytes of the current chunk still to read
    last: bool = False  # the current chunk is the last (BDAT ... LAST)
    size: int = 0  # content bytes so far (normalised)
    cr: bool = False  # a CR ended what was read: held until the next byte is known
    line_end: bool = True  # the content so far ends a line (or is empty)
    partial: int = 0  # bytes of the last line so far, when it has not ended
    too_big: bool = False
    bare_lf: bool = False  # reject_bare_lf and a bare LF: the message is void

    def start(self, size: int, last: bool) -> None:
        self.declared = self.remaining = size
        self.last = last

    def read(self, buf: bytearray) -> tuple[bytes, bool, bool]:
        """Take what the chunk still owes from *buf* (consumed in place).  Returns the
        content (b"" once the message is void), whether the chunk is complete, and
        whether anything was taken."""
        take = min(self.remaining, len(buf), PIECE)
        if take:
            with memoryview(buf) as view:
                piece = bytes(view[:take])
            del buf[:take]
            self.remaining -= take
        else:
            piece = b""
        done = self.remaining == 0
        if self.cr:
            piece = b"\r" + piece
            self.cr = False
        end = done and self.last
        if piece.endswith(b"\r") and not end:
            piece = piece[:-1]
            self.cr = True
        if piece:
            if BARE_LF.search(piece) is not None:
                if self.reject_bare_lf:
                    self.bare_lf = True
                piece = BARE_LF.sub(b"\r\n", piece)
            if self.replace_stray:
                piece = replace_stray_cr(piece)
            self.line_end = piece.endswith(b"\n")
        if end and not self.line_end:
            piece += b"\r\n"  # Postfix stores the last line with an end
            self.line_end = True
        if not piece:
            return b"", done, take > 0
        self.size += len(piece)
        lf = piece.rfind(b"\n")
        self.partial = len(piece) - lf - 1 if lf >= 0 else self.partial + len(piece)
        if self.size_limit and self.counted > self.size_limit:
            self.too_big = True
        return (b"" if self.too_big or self.bare_lf else piece), done, take > 0

    @property
    def counted(self) -> int:
        """The size Postfix measures (its act_size): lines that ended, and whole pieces
        of line_length_limit of the line that has not (Postfix's records)."""
        return self.size - (self.partial % self.line_limit if self.line_limit > 0 else self.partial)


@dataclasses.dataclass(slots=True)
class Skip:
    """Bytes of a refused BDAT still to drop, and the refusal sent after them."""

    remaining: int
    last: bool
    reply: Reply


class BdatReader(CommandReader):
    """The BDAT command and its content, for ``ServerConnection`` (which sets ``_raw``
    to None in its ``__init__``; ``_chunks`` is made by the first BDAT taken)."""

    _raw: ChunkReader | Skip | None  # raw bytes owed: the chunk's content, or bytes to drop
    _chunks: ChunkReader  # the content reader of the current BDAT message

    def _do_bdat(self, arg: str) -> Event | None:
        settings = self.settings
        if not settings.chunking or "CHUNKING" in settings.discard_ehlo:  # Postfix hangs up: content follows
            self._error("bdat", replies.BDAT_DISABLED)
            self._close("BDAT without CHUNKING")
            return None
        words = arg.split()
        if (not 1 <= len(words) <= 2 or not (words[0].isascii() and words[0].isdigit())
                or int(words[0]) > OFF_T_MAX
                or len(words) == 2 and not (words[1].isascii() and words[1].upper() == "LAST")):
            self._error("bdat", replies.SYNTAX_BDAT)
            self._close("malformed BDAT")
            return None
        size, last = int(words[0]), len(words) == 2
        if size == 0 and not last:
            return self._skip(0, last, replies.NULL_BDAT)
        if self._bdat == BDAT_ERROR:
            return self._skip(size, last, replies.chunks_discarded(size))
        if not self._bdat:  # the first chunk: decided as DATA is
            if self.state is State.RCPT:
                return BdatStart(size, last)
            return self._skip(size, last, replies.NO_VALID_RECIPIENTS if self.state is State.MAIL
                              else replies.NEED_RCPT)
        return self._chunk(size, last)

    def _chunk(self, size: int, last: bool, trigger: Trigger = NEXT_CHUNK) -> None:
        """Read a chunk of the message whose first chunk was taken (state RCPT)."""
        limit = self.settings.message_size_limit
        if limit and self._bdat_size > limit - size:
            if self._bdat == BDAT_OK:
                self._events.append(DataAborted("chunk exceeds message size limit"))
            self._skip(size, last, replies.CHUNK_TOO_BIG)
            return None
        self._bdat = BDAT_OK
        self.state = advance(self.state, trigger)
        self._chunks.start(size, last)
        self._raw = self._chunks
        return None

    def _bdat_decided(self, event: Event, reply: Reply | None) -> None:
        """respond() to BdatStart (state RCPT), ChunkEnd or DataEnd (state BDAT)."""
        if isinstance(event, BdatStart):
            if reply is not None and reply.is_error:
                self._skip(event.size, event.last, reply)
                return
            settings = self.settings
            self._chunks = ChunkReader(settings.message_size_limit, self._rejecting_bare_lf,
                                       settings.replace_stray_cr_lf, settings.line_length_limit)
            self._bdat = BDAT_OK  # a message is begun: a chunk too big now voids it
            self._chunk(event.size, event.last, BdatStart)
            return
        if reply is None:
            if not isinstance(event, ChunkEnd):
                raise LocalProtocolError("DataEnd needs an explicit reply (e.g. queued as ID)")
            reply = replies.chunk_ok(event.size)
        if reply.is_positive:
            self.command_stats["bdat/ok"] += 1
            if isinstance(event, DataEnd):
                self.junk_commands = 0
                reply = replies.chunks_queued(reply, event.size)
                self._end_transaction(DataEnd)
            else:
                self._bdat_size = self._chunks.counted
                self.state = advance(self.state, ChunkEnd)
        else:
            self.error_count += 1
            if isinstance(event, DataEnd):
                self._end_transaction(DataEnd)
            else:  # the content could not be kept: the message is void, later chunks dropped
                self._events.append(DataAborted("chunk refused"))
                self._end_transaction(DataAborted)
                self._bdat = BDAT_ERROR
        self._send(reply)
        if reply.code in (421, 521):
            self._close("closed by server")

    def _skip(self, size: int, last: bool, reply: Reply) -> None:
        """Refuse a BDAT: drop its *size* bytes, then reply (Postfix's skip_bdat); past
        1.5 times message_size_limit, reply now and end the session instead."""
        limit = self.settings.message_size_limit
        if limit and 2 * (self._bdat_size + size) > 3 * limit:  # past 1.5 times the limit (exact, in integers)
            self._error("bdat", reply)
            self._close("too much BDAT content")
            return None
        self._bdat_size += size
        self._raw = Skip(size, last, reply)
        return None

    def _read_raw(self) -> bool:
        """Take the bytes a BDAT owes from the input; True on progress."""
        raw = self._raw
        if isinstance(raw, Skip):
            take = min(raw.remaining, len(self._in))
            if take:
                del self._in[:take]
                raw.remaining -= take
            if raw.remaining:
                return take > 0
            self._raw = None
            self._skipped(raw)
            return True
        assert raw is not None
        content, done, progressed = raw.read(self._in)
        if content:
            self._events.append(DataChunk(content))
        if not done:
            return progressed
        self._raw = None
        self._pending_verb = "bdat"
        if raw.bare_lf or raw.too_big:
            last = raw.last
            self._events.append(DataAborted("bare <LF> received" if raw.bare_lf else "message too big"))
            self._end_transaction(DataAborted)
            if not last:
                self._bdat = BDAT_ERROR
            reply = self._bare_lf_reply() if raw.bare_lf else replies.MESSAGE_FILE_TOO_BIG
            self._error("bdat", reply)
            if reply.code == 521:
                self._close("bare <LF> received")
        elif raw.last:
            self._decide(DataEnd(raw.size))
        else:
            self._decide(ChunkEnd(raw.declared))
        return True

    def _skipped(self, skip: Skip) -> None:
        """A refused BDAT's bytes are read: its reply, and the state after it."""
        self._error("bdat", skip.reply)
        if skip.reply.code in (421, 521):
            self._close("closed by server")
        elif skip.last:  # Postfix: mail_reset and rcpt_reset
            if self.state in (State.MAIL, State.RCPT):
                self._events.append(Reset())
            self._end_transaction(Reset if self.helo_name is not None else RESET_BEFORE_HELO)
        else:
            self._bdat = BDAT_ERROR

