"""Fuzzing: a hypothesis state machine over the protocol core, and a bounded atheris run."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from trimail.smtp import replies
from trimail.smtp.address import AddressError, parse_path
from trimail.smtp.events import NEED_DATA, Closed, DataEnd, Event, RcptTo
from trimail.smtp.server import ServerConnection, Settings
from trimail.smtp.states import State

COMMANDS = [b"EHLO a.example", b"HELO a.example", b"MAIL FROM:<s@a.example>", b"MAIL FROM:<>",
            b"RCPT TO:<r@b.example>", b"RCPT TO:<postmaster>", b"DATA", b"RSET", b"NOOP", b"VRFY x", b"QUIT",
            b"STARTTLS", b"AUTH PLAIN AGEAYg==", b"AUTH LOGIN", b"*", b"BDAT 1", b".", b"", b"\x00", b"\xff"]


class SmtpCore(RuleBasedStateMachine):
    """Random command and content sequences, split anywhere: the machine answers every
    command, never raises, and its state stays consistent with what it accepted."""

    def __init__(self) -> None:
        super().__init__()
        self.conn = ServerConnection(Settings(recipient_limit=3, hard_error_limit=50, starttls=True, auth=True,
                                              message_size_limit=300))
        self.conn.greet()
        self.events: list[Event] = []
        self.closed = False

    def pump(self) -> None:
        while not self.closed:
            event = self.conn.next_event()
            if event is NEED_DATA:
                return
            self.events.append(event)
            if isinstance(event, Closed):
                self.closed = True
                return
            if event.needs_reply:
                self.conn.respond(replies.queued("X") if isinstance(event, DataEnd) else None)

    @rule(command=st.sampled_from(COMMANDS), end=st.sampled_from([b"\r\n", b"\n", b"\r\n\r\n"]))
    def send_command(self, command: bytes, end: bytes) -> None:
        if not self.closed:
            self.conn.receive_data(command + end)
            self.pump()

    @rule(data=st.binary(max_size=80))
    def send_bytes(self, data: bytes) -> None:
        if not self.closed and data:
            self.conn.receive_data(data)
            self.pump()

    @invariant()
    def consistent(self) -> None:
        conn = self.conn
        assert conn.recipient_count <= 3
        if conn.state is State.RCPT:
            assert conn.recipient_count >= 1
        accepted = sum(isinstance(e, RcptTo) for e in self.events)
        assert accepted >= conn.recipient_count
        for line in conn.data_to_send().split(b"\r\n")[:-1]:
            assert line[:3].isdigit() and line[3:4] in (b" ", b"-")


TestSmtpCore = SmtpCore.TestCase
TestSmtpCore.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


@settings(max_examples=500)
@given(prefix=st.sampled_from(["FROM:", "TO:"]), text=st.text(max_size=120), utf8=st.booleans())
def test_address_parser_only_raises_its_own_error(prefix, text, utf8):
    try:
        path = parse_path(prefix + text, prefix, utf8_allowed=utf8)
    except AddressError:
        return
    assert not any(ord(c) < 32 or ord(c) == 127 for c in path.address)
    assert len(path.address) <= 256


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris is not installed")
def test_atheris_harness_runs_clean_for_a_bounded_time():
    script = Path(__file__).resolve().parents[2] / "scripts" / "fuzz_smtp.py"
    result = subprocess.run([sys.executable, str(script), "-atheris_runs=30000", "-max_total_time=60"],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done" in result.stderr
