"""The milters of one session, in order (Postfix's milter.c and milter8.c's
decisions): each event goes to each filter until one answers with more than
"continue"; a filter that accepted the connection or the message hears no more of
it; a reply to CONNECT or HELO stays that filter's answer to everything after it
(Sendmail's behaviour, which Postfix keeps); a filter that is down, too slow or
broke the protocol is closed, and from then on ``milter_default_action`` answers
for it, after a warning in Postfix's words (``milter inet:host:port: can't read
SMFIC_EOH reply packet header: Connection timed out``).

Answers are Postfix's strings: None (go on), ``"D"`` (discard), ``"H"`` + reason
(hold: quarantine), ``"S"`` (shutdown, 421), or an SMTP reply ``"550 5.7.1 ..."``.

Parameters (``MilterSettings``): smtpd_milters or non_smtpd_milters, milter_protocol,
milter_default_action, milter_connect_timeout, milter_command_timeout,
milter_content_timeout, milter_*_macros, milter_macro_daemon_name, milter_macro_v,
message_size_limit and header_size_limit (the bound of one filter's modifications).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable

import trio

from trimail.milter import protocol as p
from trimail.milter.client import DEFAULT_EDIT_LIMIT, MilterClient, MilterError
from trimail.milter.edit import Content, apply
from trimail.milter.machine import MACRO_STAGE, parse_endpoint, parse_protocol
from trimail.milter.protocol import Decision, Modification

log = logging.getLogger("trimail.milter")

STAGES = ("connect", "helo", "mail", "rcpt", "data", "eoh", "eom")
MACRO_PARAMS = {"connect": "milter_connect_macros", "helo": "milter_helo_macros",
                "mail": "milter_mail_macros", "rcpt": "milter_rcpt_macros", "data": "milter_data_macros",
                "eoh": "milter_end_of_header_macros", "eom": "milter_end_of_data_macros"}
REJECTED = "550 5.7.1 Command rejected"
TEMPFAILED = "451 4.7.1 Service unavailable - try again later"
_REPLY = re.compile(r"[45]\d\d(?:[ -][45]\.\d{1,3}\.\d{1,3})?(?:[ -].*)?\Z", re.DOTALL)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _printable(text: str) -> str:
    """A filter's text (a reply line, a quarantine reason) with each control character
    as ``?``: a bare CR or LF must neither end the SMTP reply line early (the client
    would read the rest as the reply to its next command) nor start a mail log line."""
    return _CONTROL.sub("?", text)


@dataclasses.dataclass(frozen=True, slots=True)
class MilterSettings:
    names: tuple[str, ...]
    protocol: str = "6"
    default_action: str = "tempfail"
    connect_timeout: float = 30.0
    command_timeout: float = 30.0
    content_timeout: float = 300.0
    macros: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    edit_limit: int = DEFAULT_EDIT_LIMIT  # bytes of one filter's modifications to one message

    @classmethod
    def from_config(cls, config, names: list[str]) -> MilterSettings:
        return cls(names=tuple(names), protocol=config.milter_protocol,
                   default_action=config.milter_default_action,
                   connect_timeout=config.milter_connect_timeout, command_timeout=config.milter_command_timeout,
                   content_timeout=config.milter_content_timeout,
                   macros={stage: tuple(getattr(config, param)) for stage, param in MACRO_PARAMS.items()},
                   edit_limit=config.message_size_limit + config.header_size_limit + (1 << 20)
                   if config.message_size_limit else DEFAULT_EDIT_LIMIT)


def valid_reply(text: str) -> bool:
    """Postfix's milter8_valid_smtp_reply: 4xx/5xx, optional enhanced code of the same
    class, every line of a multi-line reply with the same code."""
    lines = text.split("\r\n")
    code = lines[0][:3]
    for line in lines:
        if not _REPLY.match(line) or line[:3] != code:
            return False
        if len(line) > 4 and line[4] in "45" and line[4] != code[0] and line[5:6] == ".":
            return False
    return True


def failure_reply(action: str, configuration: bool = False) -> str | None:
    """milter_default_action's answer for a filter that failed (Postfix's
    milter8_comm_error; *configuration*: milter8_conf_error, a bad milter name)."""
    if action == "accept":
        return None
    if action == "quarantine":
        return "Hdefault_action"
    if configuration:
        return "421 4.3.5 Server configuration problem - try again later" if action == "shutdown" \
            else "451 4.3.5 Server configuration problem - try again later"
    return {"reject": "550 5.5.0 Service unavailable", "shutdown": "421 4.7.1 Service unavailable - try again later",
            }.get(action, TEMPFAILED)


class _Filter:
    """One filter in one session and Postfix's state for it."""

    def __init__(self, name: str, settings: MilterSettings) -> None:
        self.name = name
        self.client = MilterClient(name, settings.protocol, connect_timeout=settings.connect_timeout,
                                   command_timeout=settings.command_timeout,
                                   content_timeout=settings.content_timeout, edit_limit=settings.edit_limit)
        self.state = "new"  # new, envelope, accept_con, reject_con, accept_msg, error
        self.persistent: str | None = None  # the reply that stays (def_reply)
        self.in_message = False  # MAIL sent since the last ABORT or end of message


class Milters:
    """The session's filters; *macro* gives a macro's value (None: not sent)."""

    def __init__(self, settings: MilterSettings, macro: Callable[[str], str | None]) -> None:
        self.settings = settings
        self.macro = macro
        self.filters = [_Filter(name, settings) for name in settings.names]

    def _fail(self, f: _Filter, text: str, configuration: bool = False) -> str | None:
        if text.startswith("connect to Milter service"):
            log.warning("%s", text)
        else:
            log.warning("milter %s: %s", f.name, text)
        f.client.close(quit=False)
        f.state = "error"
        f.persistent = failure_reply(self.settings.default_action, configuration)
        return f.persistent

    def _macros(self, f: _Filter, event: str) -> list[tuple[str, str]]:
        names = f.client.conversation.macro_names(event, self.settings.macros.get(MACRO_STAGE[event], ()))
        out = []
        for name in names:
            value = self.macro(name)
            if value is not None:
                out.append((name, value))
        return out

    async def connect(self, hostname: str, address: str, port: int) -> str | None:
        """SMFIC_CONNECT to each filter, opening the connections (one per SMTP session,
        as Postfix)."""
        try:
            parse_protocol(self.settings.protocol)
        except ValueError as exc:
            for f in self.filters:
                self._fail(f, str(exc), configuration=True)
            return self.filters[0].persistent if self.filters else None
        for f in self.filters:
            try:
                parse_endpoint(f.name)
            except ValueError as exc:
                log.warning("%s", exc)
                f.state, f.persistent = "error", failure_reply(self.settings.default_action, True)
                continue
            try:
                await f.client.open()
            except MilterError as exc:
                self._fail(f, str(exc))
                continue
            f.state = "envelope"
        name = hostname if hostname != "unknown" else f"[{address}]"
        return await self._event("connect", p.encode_connect(name, address, port))

    async def helo(self, name: str) -> str | None:
        return await self._event("helo", p.encode_args(p.SMFIC_HELO, [name]))

    async def mail(self, args: list[str]) -> str | None:
        await self.abort()  # a new transaction: the filters forget the last one
        for f in self.filters:
            f.in_message = f.state == "envelope"
        return await self._event("mail", p.encode_args(p.SMFIC_MAIL, args))

    async def rcpt(self, args: list[str]) -> str | None:
        return await self._event("rcpt", p.encode_args(p.SMFIC_RCPT, args))

    async def data(self) -> str | None:
        return await self._event("data", p.frame(p.SMFIC_DATA))

    async def _event(self, event: str, payload: bytes) -> str | None:
        connection = event in ("connect", "helo")
        for f in self.filters:
            if f.state in ("error", "new", "accept_con", "reject_con") or (
                    f.state == "accept_msg" and not connection):
                if f.persistent is not None:
                    return f.persistent
                continue
            edits: list[Modification] = []
            try:
                decision = await f.client.event(event, payload, self._macros(f, event), edits)
            except MilterError as exc:
                resp = self._fail(f, str(exc))
            else:
                if edits:  # a quarantine before the end of the message: it stays (Postfix)
                    f.persistent = "H" + _printable(edits[-1].value[:100])
                resp = self._decide(f, event, decision)
            if resp is not None:
                return resp
        return None

    def _decide(self, f: _Filter, event: str, decision: Decision | None) -> str | None:
        """Postfix's milter8_event reply switch, for one final answer."""
        connection = event in ("connect", "helo")
        if decision is None or decision.kind in ("continue", "skip"):
            return f.persistent
        kind = decision.kind
        if kind == "accept":
            f.state = "accept_con" if connection else "accept_msg"
            return f.persistent
        if kind == "discard":
            f.state = "accept_msg"
            return "D"
        if kind == "replycode":
            text = "\r\n".join(_printable(line) for line in decision.text.split("\r\n"))
            if not valid_reply(text):
                return self._fail(f, f"malformed reply: {text}", configuration=True)
            resp = re.sub(r"%(.?)", lambda m: m.group(1) if m.group(1) == "%" else "", text)
        elif kind == "reject":
            resp = REJECTED
        elif kind in ("tempfail", "connfail"):
            resp = TEMPFAILED
        else:  # shutdown
            resp = "S"
        if connection:
            f.state, f.persistent = "reject_con", resp
        return resp

    async def message(self, content: Content) -> str | None:
        """The message to each filter in turn: its headers (not our own Received:),
        end of headers, the body in chunks, end of message; each filter's edits are
        applied to *content* before the next one sees it."""
        for f in self.filters:
            if f.state != "envelope":
                if f.persistent is not None:
                    return f.persistent
                continue
            edits: list[Modification] = []
            try:
                resp = await self._content(f, content, edits)
            except MilterError as exc:
                return self._fail(f, str(exc))
            f.in_message = False
            hold = [e for e in edits if e.kind == "quarantine"]
            try:
                # in a worker thread: up to MAX_EDITS edits, each a scan of up to
                # header_size_limit's fields, cost seconds the event loop cannot spend
                await trio.to_thread.run_sync(apply, content, [e for e in edits if e.kind != "quarantine"],
                                              f.client.conversation.leading_space)
            except ValueError as exc:
                return self._fail(f, str(exc))
            if hold:
                held = "H" + _printable(hold[-1].value[:100])
                resp = resp if resp is not None and resp[0] in "45DS" else held
            if resp is not None:
                return resp
        return None

    async def _content(self, f: _Filter, content: Content, edits: list[Modification]) -> str | None:
        client = f.client
        conv = client.conversation
        macros = self._macros(f, "eoh")
        for name, value in content.visible_headers():
            if not conv.wants("header"):
                break
            if not conv.leading_space and value.startswith(" "):
                value = value[1:]
            decision = await client.event("header", p.encode_header(name, value), macros, edits)
            if decision is not None and decision.kind != "continue":
                return self._decide(f, "header", decision)
        decision = await client.event("eoh", p.frame(p.SMFIC_EOH), macros, edits)
        if decision is not None and decision.kind not in ("continue", "skip"):
            return self._decide(f, "eoh", decision)
        macros = self._macros(f, "eom")
        if conv.wants("body"):
            async for chunk in content.body_chunks(p.CHUNK_SIZE):
                decision = await client.event("body", p.frame(p.SMFIC_BODY, chunk), macros, edits)
                if decision is not None and decision.kind == "skip":
                    break
                if decision is not None and decision.kind != "continue":
                    return self._decide(f, "body", decision)
        decision = await client.event("eom", p.frame(p.SMFIC_BODYEOB), macros, edits)
        return self._decide(f, "eom", decision)

    async def abort(self) -> None:
        """SMFIC_ABORT to the filters in a transaction (RSET, a new MAIL, a refused
        message): they forget it; accepting the message ends with it."""
        for f in self.filters:
            if f.in_message and f.state in ("envelope", "accept_msg"):
                f.in_message = False
                try:
                    await f.client.send(p.frame(p.SMFIC_ABORT))
                except MilterError as exc:
                    self._fail(f, str(exc))
                    continue
            if f.state == "accept_msg":
                f.state = "envelope"
            if f.state == "envelope" and f.persistent and f.persistent[0] == "H":
                f.persistent = None  # a quarantine holds one message, not the session's next ones

    def close(self) -> None:
        for f in self.filters:
            f.client.close()
