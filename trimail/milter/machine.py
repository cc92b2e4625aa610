"""One milter conversation as a state machine, sans-IO (Postfix's milter8.c, the
protocol side).

``Conversation.open()`` gives the SMFIC_OPTNEG request; ``negotiated()`` checks the
filter's answer (its version no newer than ours, no action we did not offer) and
keeps what it asked for: the events it does not want (SMFIP_NO*), the replies it
will not send (SMFIP_NR_*), header values with their leading space
(SMFIP_HDR_LEADSPC), its own macro lists.  ``event()`` gives the bytes for one
event (its macros first, as Postfix sends them even for an event the filter does not
want) and whether a reply follows; ``check()`` says whether a frame the filter sent
is legal after that event: modifications only at end of message and only those
negotiated, DISCARD never at connect or HELO.  After SMFIR_SKIP the rest of the
same event (body chunks) is not sent.

Parameters: none read (milter_protocol's text is parsed here for the registry).
"""

from __future__ import annotations

from trimail.milter import protocol as p
from trimail.milter.protocol import (
    Decision,
    MilterProtocolError,
    Modification,
    OptNeg,
    Progress,
    Response,
)

# event name -> (command, "do not send" flag, "no reply" flag)
EVENTS: dict[str, tuple[bytes, int, int]] = {
    "connect": (p.SMFIC_CONNECT, p.SMFIP_NOCONNECT, p.SMFIP_NR_CONN),
    "helo": (p.SMFIC_HELO, p.SMFIP_NOHELO, p.SMFIP_NR_HELO),
    "mail": (p.SMFIC_MAIL, p.SMFIP_NOMAIL, p.SMFIP_NR_MAIL),
    "rcpt": (p.SMFIC_RCPT, p.SMFIP_NORCPT, p.SMFIP_NR_RCPT),
    "data": (p.SMFIC_DATA, p.SMFIP_NODATA, p.SMFIP_NR_DATA),
    "header": (p.SMFIC_HEADER, p.SMFIP_NOHDRS, p.SMFIP_NR_HDR),
    "eoh": (p.SMFIC_EOH, p.SMFIP_NOEOH, p.SMFIP_NR_EOH),
    "body": (p.SMFIC_BODY, p.SMFIP_NOBODY, p.SMFIP_NR_BODY),
    "eom": (p.SMFIC_BODYEOB, 0, 0),
}
# the macro list that goes with each event (header, eoh and body share end-of-header/-data's)
MACRO_STAGE = {"connect": "connect", "helo": "helo", "mail": "mail", "rcpt": "rcpt", "data": "data",
               "header": "eoh", "eoh": "eoh", "body": "eom", "eom": "eom"}

# which negotiated action each modification needs
NEEDS = {"addheader": p.SMFIF_ADDHDRS, "insheader": p.SMFIF_ADDHDRS, "chgheader": p.SMFIF_CHGHDRS,
         "replbody": p.SMFIF_CHGBODY, "addrcpt": p.SMFIF_ADDRCPT | p.SMFIF_ADDRCPT_PAR,
         "delrcpt": p.SMFIF_DELRCPT, "chgfrom": p.SMFIF_CHGFROM, "quarantine": p.SMFIF_QUARANTINE}


def parse_protocol(text: str) -> tuple[int, int]:
    """milter_protocol (``6``, ``4``, ``3``, ``2``, plus ``no_header_reply``) as
    (version, event mask); ValueError for anything else, as Postfix's "bad protocol
    information"."""
    version, mask = 0, 0
    for word in text.replace(",", " ").split():
        if word == "no_header_reply":
            mask |= p.SMFIP_NR_HDR
        elif word.isdigit() and int(word) in p.VERSION_MASKS and not version:
            version = int(word)
            mask |= p.VERSION_MASKS[version]
        else:
            raise ValueError(f"bad protocol information: {word}")
    if not version:
        raise ValueError("no protocol version information")
    return version, mask


def parse_endpoint(name: str) -> tuple[str, str, int]:
    """``inet:host:port`` (``inet:[::1]:port`` for IPv6, ``inet:port@host`` as
    Sendmail writes it) or ``unix:/path`` as (transport, host or path, port);
    ValueError as Postfix's "Milter service needs transport:endpoint"."""
    transport, sep, endpoint = name.partition(":")
    if not sep or not endpoint or not transport:
        raise ValueError(f'Milter service needs transport:endpoint instead of "{name}"')
    if transport in ("unix", "local"):
        return "unix", endpoint, 0
    if transport != "inet":
        raise ValueError(f"invalid transport name: {transport} in Milter service: {name}")
    if "@" in endpoint:
        port, _, host = endpoint.partition("@")
    else:
        host, _, port = endpoint.rpartition(":")
    host = host.strip("[]") or "localhost"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad port in Milter service: {name}")
    return "inet", host, int(port)


class Conversation:
    """The protocol state of one connection to one filter."""

    def __init__(self, protocol: str = "6", actions: int = p.ALL_ACTIONS) -> None:
        self.version, self.events = parse_protocol(protocol)
        self.actions = actions
        self.np_mask = p.NOSEND_MASK & ~self.events  # events our version does not have
        self.ev_mask = 0  # the filter's protocol flags
        self.rq_mask = 0  # the actions it asked for
        self.macros: dict[str, tuple[str, ...]] = {}  # its own macro lists (SMFIR_SETSYMLIST)
        self.ready = False
        self.skip_event = ""

    def open(self) -> bytes:
        return p.encode_optneg(self.version, self.actions, self.events)

    def negotiated(self, answer: Response) -> None:
        if not isinstance(answer, OptNeg):
            raise MilterProtocolError("unexpected reply in initial handshake")
        if answer.version > self.version or answer.version < 2:
            raise MilterProtocolError(f"protocol version {answer.version} conflict with MTA protocol "
                                      f"version {self.version}")
        if answer.actions & self.actions != answer.actions:
            raise MilterProtocolError(f"request mask 0x{answer.actions:x} conflict with MTA request mask "
                                      f"0x{self.actions:x}")
        if answer.version < self.version:  # an older filter gets only its version's events
            older = max(v for v in p.VERSION_MASKS if v <= answer.version)
            self.np_mask |= p.NOSEND_MASK & ~p.VERSION_MASKS[older]
        self.ev_mask, self.rq_mask = answer.protocol, answer.actions
        self.macros = dict(answer.macros)
        self.ready = True

    @property
    def leading_space(self) -> bool:
        """SMFIP_HDR_LEADSPC: header values go (and come) with their leading space."""
        return bool(self.ev_mask & p.SMFIP_HDR_LEADSPC)

    def macro_names(self, event: str, configured: tuple[str, ...]) -> tuple[str, ...]:
        return self.macros.get(MACRO_STAGE[event], configured)

    def wants(self, event: str) -> bool:
        """Will ``event()`` send the event itself (not only its macros)?"""
        _, nosend, _ = EVENTS[event]
        if nosend & self.np_mask or nosend & self.ev_mask:
            return False
        return self.skip_event != event

    def event(self, event: str, payload: bytes, macros: list[tuple[str, str]]) -> tuple[bytes, bool]:
        """The bytes for *event* (*payload*: its encoded frame) and whether the filter
        will reply.  Nothing at all for an event our protocol version lacks or that
        the filter skipped; only the macros for one it does not want."""
        command, nosend, noreply = EVENTS[event]
        if nosend & self.np_mask:
            return b"", False
        if self.skip_event:
            if self.skip_event == event:
                return b"", False
            self.skip_event = ""
        out = p.encode_macros(command, macros) if macros else b""
        if nosend & self.ev_mask:
            return out, False
        return out + payload, not noreply & self.ev_mask

    def check(self, event: str, response: Response) -> Decision | Modification | None:
        """*response* after *event*: a final Decision, a Modification (end of message
        only), or None (progress: keep waiting).  MilterProtocolError when illegal."""
        if isinstance(response, Progress):
            return None
        if isinstance(response, Modification):
            if event != "eom" and response.kind != "quarantine":  # Postfix takes a quarantine anywhere
                raise MilterProtocolError(f"unexpected filter response {response.kind} after event {event}")
            if not NEEDS[response.kind] & self.rq_mask:
                raise MilterProtocolError(f"{response.kind} was not negotiated")
            return response
        if isinstance(response, OptNeg):
            raise MilterProtocolError(f"unexpected filter response SMFIC_OPTNEG after event {event}")
        if response.kind == "discard" and event in ("connect", "helo"):
            raise MilterProtocolError("DISCARD action is not allowed for connect or helo")
        if response.kind == "skip":
            self.skip_event = event
        return response
