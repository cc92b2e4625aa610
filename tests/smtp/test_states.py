"""The server's one transition table (smtp/states.py) and the one function that moves."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.smtp.driver import Driver
from trimail.smtp import server
from trimail.smtp.events import Closed, DataEnd, DataStart, Hello, MailFrom, RcptTo
from trimail.smtp.server import Settings
from trimail.smtp.states import GREET, TRANSITIONS, LocalProtocolError, State, advance

MACHINE = [Path(server.__file__).with_name(name) for name in ("server.py", "reader.py")]


def test_a_move_the_table_does_not_list_raises_local_protocol_error():
    with pytest.raises(LocalProtocolError, match="no move from READY on DataStart"):
        advance(State.READY, DataStart)
    with pytest.raises(LocalProtocolError, match="no move from CLOSED on Closed"):
        advance(State.CLOSED, Closed)
    with pytest.raises(LocalProtocolError, match="no move from DATA on greet"):
        advance(State.DATA, GREET)


def test_listed_moves_give_the_table_s_state():
    assert advance(State.GREETING, GREET) is State.INIT
    assert advance(State.RCPT, DataStart) is State.DATA
    assert advance(State.DATA, DataEnd) is State.READY


def test_every_state_is_reachable_from_the_greeting_and_every_state_can_close():
    seen, todo = {State.GREETING}, [State.GREETING]
    while todo:
        for target in TRANSITIONS[todo.pop()].values():
            if target not in seen:
                seen.add(target)
                todo.append(target)
    assert seen == set(State)
    assert all(TRANSITIONS[state].get(Closed) is State.CLOSED for state in State if state is not State.CLOSED)
    assert TRANSITIONS[State.CLOSED] == {}


def test_the_machine_changes_state_only_through_advance():
    """Every assignment to ``self.state`` in the machine's modules but the initial one
    is ``advance(self.state, ...)``."""
    moves, others = 0, []
    for node in (node for path in MACHINE for node in ast.walk(ast.parse(path.read_text()))):
        if not isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
            continue
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        for target in targets:
            if not (isinstance(target, ast.Attribute) and target.attr == "state"
                    and isinstance(target.value, ast.Name) and target.value.id == "self"):
                continue
            value = node.value
            if (isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "advance"
                    and ast.unparse(value.args[0]) == "self.state"):
                moves += 1
            else:
                others.append(ast.unparse(node))
    assert others == ["self.state = State.GREETING"]
    assert moves >= 10


def test_the_command_sequence_rules_come_from_the_table():
    """What the machine accepts in a state is what the table lists: RCPT before MAIL is
    refused, and MAIL with smtpd_helo_required before HELO too, though the table has it."""
    d = Driver()
    d.feed(b"RCPT TO:<r@example.org>\r\n")
    assert d.replies()[-1] == "503 5.5.1 Error: need MAIL command"
    assert RcptTo not in TRANSITIONS[State.INIT] and MailFrom in TRANSITIONS[State.INIT]
    d.feed(b"MAIL FROM:<s@example.org>\r\n")
    assert d.replies()[-1] == "250 2.1.0 Ok" and d.conn.state is State.MAIL
    strict = Driver(Settings(helo_required=True))
    strict.feed(b"MAIL FROM:<s@example.org>\r\nHELO client.example\r\n")
    assert strict.replies()[-2:] == ["503 5.5.1 Error: send HELO/EHLO first", "250 localhost"]
    assert Hello in TRANSITIONS[State.RCPT]
