"""The milter protocol (version 6, as Sendmail's libmilter speaks it), sans-IO.

Frames: a 4-byte big-endian length (counting the command byte), one command
byte, then the data.  ``FrameReader`` takes bytes and gives whole frames, refusing
a frame longer than its bound before buffering it; ``parse_response`` turns one
frame from a filter into a value (``Decision``, a ``Modification`` or ``OptNeg``);
the ``encode_*`` functions build the MTA's commands.  Nothing here does I/O, keeps
time or logs: ``trimail.milter.machine`` keeps one conversation's state, and
``trimail.milter.client`` moves its bytes.

Security notes: every length is checked against the frame before it is used (a
string must end in NUL inside its frame), the frame size is bounded
(``MAX_FRAME``; libmilter's own largest is 1 MiB with MILTER_MAX_DATA_SIZE raised),
and malformed input raises ``MilterProtocolError``, never anything else.

Parameters: none read.
"""

from __future__ import annotations

import dataclasses
import struct

MAX_FRAME = 1 << 20  # the largest frame accepted from a filter (bytes, with the command byte)
CHUNK_SIZE = 65535  # body bytes per SMFIC_BODY (libmilter's MILTER_CHUNK_SIZE)

# Commands, MTA -> filter
SMFIC_ABORT, SMFIC_BODY, SMFIC_CONNECT, SMFIC_MACRO = b"A", b"B", b"C", b"D"
SMFIC_BODYEOB, SMFIC_HELO, SMFIC_HEADER, SMFIC_MAIL = b"E", b"H", b"L", b"M"
SMFIC_EOH, SMFIC_OPTNEG, SMFIC_QUIT, SMFIC_RCPT = b"N", b"O", b"Q", b"R"
SMFIC_DATA, SMFIC_UNKNOWN, SMFIC_QUIT_NC = b"T", b"U", b"K"

# Responses, filter -> MTA
SMFIR_ADDRCPT, SMFIR_DELRCPT, SMFIR_ACCEPT, SMFIR_REPLBODY = b"+", b"-", b"a", b"b"
SMFIR_CONTINUE, SMFIR_DISCARD, SMFIR_CONN_FAIL, SMFIR_CHGHEADER = b"c", b"d", b"f", b"m"
SMFIR_PROGRESS, SMFIR_REJECT, SMFIR_TEMPFAIL, SMFIR_SHUTDOWN = b"p", b"r", b"t", b"4"
SMFIR_ADDHEADER, SMFIR_INSHEADER, SMFIR_REPLYCODE, SMFIR_QUARANTINE = b"h", b"i", b"y", b"q"
SMFIR_SKIP, SMFIR_CHGFROM, SMFIR_ADDRCPT_PAR, SMFIR_SETSYMLIST = b"s", b"e", b"2", b"l"

# Protocol flags (SMFIP_*): events the filter does not want, replies it will not send
SMFIP_NOCONNECT = 1 << 0
SMFIP_NOHELO = 1 << 1
SMFIP_NOMAIL = 1 << 2
SMFIP_NORCPT = 1 << 3
SMFIP_NOBODY = 1 << 4
SMFIP_NOHDRS = 1 << 5
SMFIP_NOEOH = 1 << 6
SMFIP_NR_HDR = 1 << 7
SMFIP_NOUNKNOWN = 1 << 8
SMFIP_NODATA = 1 << 9
SMFIP_SKIP = 1 << 10
SMFIP_RCPT_REJ = 1 << 11
SMFIP_NR_CONN = 1 << 12
SMFIP_NR_HELO = 1 << 13
SMFIP_NR_MAIL = 1 << 14
SMFIP_NR_RCPT = 1 << 15
SMFIP_NR_DATA = 1 << 16
SMFIP_NR_UNKN = 1 << 17
SMFIP_NR_EOH = 1 << 18
SMFIP_NR_BODY = 1 << 19
SMFIP_HDR_LEADSPC = 1 << 20

NOSEND_MASK = (SMFIP_NOCONNECT | SMFIP_NOHELO | SMFIP_NOMAIL | SMFIP_NORCPT | SMFIP_NOBODY
               | SMFIP_NOHDRS | SMFIP_NOEOH | SMFIP_NOUNKNOWN | SMFIP_NODATA)
NOREPLY_MASK = (SMFIP_NR_CONN | SMFIP_NR_HELO | SMFIP_NR_MAIL | SMFIP_NR_RCPT | SMFIP_NR_DATA
                | SMFIP_NR_UNKN | SMFIP_NR_HDR | SMFIP_NR_EOH | SMFIP_NR_BODY)
# What each protocol version may negotiate (Postfix's milter8_event_masks)
V2_MASK = SMFIP_NOCONNECT | SMFIP_NOHELO | SMFIP_NOMAIL | SMFIP_NORCPT | SMFIP_NOBODY | SMFIP_NOHDRS | SMFIP_NOEOH
V3_MASK = V2_MASK | SMFIP_NOUNKNOWN
V4_MASK = V3_MASK | SMFIP_NODATA
V6_MASK = V4_MASK | SMFIP_SKIP | SMFIP_RCPT_REJ | NOREPLY_MASK | SMFIP_HDR_LEADSPC
VERSION_MASKS = {6: V6_MASK, 4: V4_MASK, 3: V3_MASK, 2: V2_MASK}

# Actions the filter may ask for (SMFIF_*)
SMFIF_ADDHDRS = 1 << 0
SMFIF_CHGBODY = 1 << 1
SMFIF_ADDRCPT = 1 << 2
SMFIF_DELRCPT = 1 << 3
SMFIF_CHGHDRS = 1 << 4
SMFIF_QUARANTINE = 1 << 5
SMFIF_CHGFROM = 1 << 6
SMFIF_ADDRCPT_PAR = 1 << 7
SMFIF_SETSYMLIST = 1 << 8
ALL_ACTIONS = (1 << 9) - 1

# Address families in SMFIC_CONNECT
SMFIA_UNKNOWN, SMFIA_UNIX, SMFIA_INET, SMFIA_INET6 = b"U", b"L", b"4", b"6"

# Macro classes (SMFIM_*): which event's macro list a SMFIR_SETSYMLIST replaces
MACRO_STAGES = ("connect", "helo", "mail", "rcpt", "data", "eom", "eoh")


class MilterProtocolError(Exception):
    """The filter broke the protocol (a bad frame, an unexpected reply)."""


# -- what a filter says ------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class OptNeg:
    """The filter's SMFIC_OPTNEG answer: its version, the actions it wants, the
    protocol flags it sets, and the macro lists it asks for (SMFIR_SETSYMLIST data)."""

    version: int
    actions: int
    protocol: int
    macros: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    """A final answer to one event: continue, accept, reject, tempfail, discard,
    replycode (*text*: the filter's SMTP reply), skip, shutdown, connfail."""

    kind: str
    text: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class Modification:
    """An edit requested at end of message: addheader, chgheader, insheader, chgfrom,
    addrcpt, delrcpt, replbody, quarantine.  *index* is 1-based for chgheader (0 taken
    as 1, as Sendmail) and 0-based for insheader (0: the top)."""

    kind: str
    name: str = ""
    value: str = ""
    index: int = 0
    args: str = ""
    data: bytes = b""


@dataclasses.dataclass(frozen=True, slots=True)
class Progress:
    """SMFIR_PROGRESS: still working, restart the timer."""


Response = OptNeg | Decision | Modification | Progress

_SIMPLE = {SMFIR_CONTINUE: "continue", SMFIR_ACCEPT: "accept", SMFIR_REJECT: "reject",
           SMFIR_TEMPFAIL: "tempfail", SMFIR_DISCARD: "discard", SMFIR_SKIP: "skip",
           SMFIR_SHUTDOWN: "shutdown", SMFIR_CONN_FAIL: "connfail"}
NAMES = {SMFIR_ADDRCPT: "SMFIR_ADDRCPT", SMFIR_DELRCPT: "SMFIR_DELRCPT", SMFIR_ACCEPT: "SMFIR_ACCEPT",
         SMFIR_REPLBODY: "SMFIR_REPLBODY", SMFIR_CONTINUE: "SMFIR_CONTINUE", SMFIR_DISCARD: "SMFIR_DISCARD",
         SMFIR_CONN_FAIL: "SMFIR_CONN_FAIL", SMFIR_CHGHEADER: "SMFIR_CHGHEADER",
         SMFIR_PROGRESS: "SMFIR_PROGRESS", SMFIR_REJECT: "SMFIR_REJECT", SMFIR_TEMPFAIL: "SMFIR_TEMPFAIL",
         SMFIR_SHUTDOWN: "SMFIR_SHUTDOWN", SMFIR_ADDHEADER: "SMFIR_ADDHEADER",
         SMFIR_INSHEADER: "SMFIR_INSHEADER", SMFIR_REPLYCODE: "SMFIR_REPLYCODE",
         SMFIR_QUARANTINE: "SMFIR_QUARANTINE", SMFIR_SKIP: "SMFIR_SKIP", SMFIR_CHGFROM: "SMFIR_CHGFROM",
         SMFIR_ADDRCPT_PAR: "SMFIR_ADDRCPT_PAR", SMFIR_SETSYMLIST: "SMFIR_SETSYMLIST",
         SMFIC_OPTNEG: "SMFIC_OPTNEG"}


class FrameReader:
    """Bytes in, ``(command, data)`` frames out; a frame over *max_size* is refused
    as soon as its length is read."""

    def __init__(self, max_size: int = MAX_FRAME) -> None:
        self._buffer = bytearray()
        self._max = max_size

    def receive_data(self, data: bytes) -> None:
        self._buffer += data

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def next_frame(self) -> tuple[bytes, bytes] | None:
        """The next whole frame, or None when more bytes are needed."""
        if len(self._buffer) < 4:
            return None
        (length,) = struct.unpack_from(">I", self._buffer)
        if length == 0:
            raise MilterProtocolError("bad packet length: 0")
        if length > self._max:
            raise MilterProtocolError(f"unreasonable packet length: {length} > {self._max}")
        if len(self._buffer) < 4 + length:
            return None
        command = bytes(self._buffer[4:5])
        data = bytes(self._buffer[5:4 + length])
        del self._buffer[:4 + length]
        return command, data


def _strings(data: bytes, count: int, *, more: bool = False) -> list[str]:
    """*count* NUL-terminated strings from *data* (decoded leniently); with *more*,
    up to *count* (at least one)."""
    parts = data.split(b"\0")
    if not data.endswith(b"\0"):
        raise MilterProtocolError("missing string null terminator")
    parts = parts[:-1]
    if len(parts) != count and not (more and 1 <= len(parts) <= count):
        raise MilterProtocolError(f"expected {count} strings, got {len(parts)}")
    return [p.decode("utf-8", "surrogateescape") for p in parts]


def _index(data: bytes) -> tuple[int, bytes]:
    if len(data) < 4:
        raise MilterProtocolError("packet too short for network long")
    return struct.unpack_from(">I", data)[0], data[4:]


def parse_response(command: bytes, data: bytes) -> Response:
    """One frame from a filter as a value; MilterProtocolError if malformed."""
    if command in _SIMPLE:
        if data:
            raise MilterProtocolError(f"reply {NAMES[command]} was followed by {len(data)} data bytes")
        return Decision(_SIMPLE[command])
    if command == SMFIR_PROGRESS:
        if data:
            raise MilterProtocolError(f"reply SMFIR_PROGRESS was followed by {len(data)} data bytes")
        return Progress()
    if command == SMFIR_REPLYCODE:
        (text,) = _strings(data, 1)
        return Decision("replycode", text)
    if command == SMFIR_QUARANTINE:
        (reason,) = _strings(data, 1)
        return Modification("quarantine", value=reason)
    if command == SMFIR_ADDHEADER:
        name, value = _strings(data, 2)
        return Modification("addheader", name=name, value=value)
    if command in (SMFIR_CHGHEADER, SMFIR_INSHEADER):
        index, rest = _index(data)
        name, value = _strings(rest, 2)
        return Modification("chgheader" if command == SMFIR_CHGHEADER else "insheader", name=name,
                            value=value, index=index)
    if command in (SMFIR_CHGFROM, SMFIR_ADDRCPT_PAR):
        parts = _strings(data, 2, more=True)
        return Modification("chgfrom" if command == SMFIR_CHGFROM else "addrcpt", value=parts[0],
                            args=parts[1] if len(parts) > 1 else "")
    if command in (SMFIR_ADDRCPT, SMFIR_DELRCPT):
        (address,) = _strings(data, 1)
        return Modification("addrcpt" if command == SMFIR_ADDRCPT else "delrcpt", value=address)
    if command == SMFIR_REPLBODY:
        return Modification("replbody", data=data)
    if command == SMFIC_OPTNEG:
        return parse_optneg(data)
    raise MilterProtocolError(f"unknown reply code {command!r}")


def parse_optneg(data: bytes) -> OptNeg:
    if len(data) < 12:
        raise MilterProtocolError("option negotiation reply too short")
    version, actions, protocol = struct.unpack_from(">III", data)
    rest = data[12:]
    macros: dict[str, tuple[str, ...]] = {}
    while rest:  # secondary negotiation: SMFIM_* number and a NUL-terminated list of names
        if len(rest) < 5:
            raise MilterProtocolError("macro list too short")
        (stage,) = struct.unpack_from(">I", rest)
        end = rest.find(b"\0", 4)
        if end < 0:
            raise MilterProtocolError("macro list without null terminator")
        names = rest[4:end].decode("ascii", "replace").replace(",", " ").split()
        rest = rest[end + 1:]
        if stage < len(MACRO_STAGES):  # Postfix: unknown types are ignored (with a warning)
            macros[MACRO_STAGES[stage]] = tuple(names)
    return OptNeg(version, actions, protocol, macros)


# -- what the MTA says -------------------------------------------------------

def frame(command: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data) + 1) + command + data


def _z(text: str) -> bytes:
    """A string field: UTF-8 (undecodable client bytes kept as they came), NUL-terminated;
    a NUL inside is cut, since the filter would read it as the end."""
    return text.encode("utf-8", "surrogateescape").replace(b"\0", b"") + b"\0"


def encode_optneg(version: int, actions: int, protocol: int) -> bytes:
    return frame(SMFIC_OPTNEG, struct.pack(">III", version, actions, protocol))


def encode_macros(command: bytes, macros: list[tuple[str, str]]) -> bytes:
    return frame(SMFIC_MACRO, command + b"".join(_z(name) + _z(value) for name, value in macros))


def encode_connect(hostname: str, address: str, port: int) -> bytes:
    if not address or address == "unknown":
        return frame(SMFIC_CONNECT, _z(hostname) + SMFIA_UNKNOWN)
    if address.startswith("/"):
        family = SMFIA_UNIX
        port = 0
    else:
        family = SMFIA_INET6 if ":" in address else SMFIA_INET
    return frame(SMFIC_CONNECT, _z(hostname) + family + struct.pack(">H", port) + _z(address))


def encode_args(command: bytes, args: list[str]) -> bytes:
    """SMFIC_HELO, SMFIC_MAIL, SMFIC_RCPT: each argument a string."""
    return frame(command, b"".join(_z(a) for a in args))


def encode_header(name: str, value: str) -> bytes:
    return frame(SMFIC_HEADER, _z(name) + _z(value))
