"""Concurrency feedback per destination (Postfix's qmgr_queue.c / qmgr_feedback.c):
end to end against a connection-limited peer, and the window arithmetic itself."""

from __future__ import annotations

import logging

import trio

from tests.conftest import wait_for
from tests.delivery.test_delivery import queue, send, wait_empty
from tests.scheduler.fleet import LimitedPeer

HOST = "127.0.70.1"


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


async def test_a_site_allowing_two_sessions_gets_all_30_messages_in_one_run(start_mta, nursery):
    """A peer that allows 2 concurrent sessions and answers 421 beyond that: the
    421s lower the destination's window and leave the mail queued for the sessions
    that are up; all 30 messages are delivered in this run (none waits for
    minimal_backoff_time), and the peer never has more than 2 sessions."""
    peer = LimitedPeer(max_sessions=2, delay=0.1)
    port = await nursery.start(peer.run, HOST)
    smtp_log = logging.getLogger("trimail.smtp")
    lines = Lines()
    smtp_log.addHandler(lines)
    level = smtp_log.level
    smtp_log.setLevel(logging.INFO)
    try:
        srv = await start_mta(relayhost=f"[{HOST}]:{port}")
        started = trio.current_time()
        for i in range(30):
            await send(srv, "a@client.example", [f"r{i}@far.example"])
        await wait_empty(srv, timeout=30)
        took = trio.current_time() - started
    finally:
        smtp_log.removeHandler(lines)
        smtp_log.setLevel(level)
    deferred = [line for line in lines.lines if "status=deferred" in line]
    print(f"\n30 messages to a 2-session peer: {took:.1f} s, {peer.sessions} sessions, "
          f"{peer.refused} refused with 421, most at once {peer.most_sessions}, {len(deferred)} deferred")
    assert sorted(peer.recipients()) == sorted(f"r{i}@far.example" for i in range(30))
    assert peer.refused >= 1  # the window was tried above 2: the feedback had work to do
    assert peer.most_sessions <= 2
    assert deferred == []
    assert not queue(srv)


async def test_421_beyond_the_limit_costs_few_connections(start_mta, nursery):
    """Negative feedback: after the first 421s the window shrinks to what the site
    allows, so a backlog of 40 messages costs a handful of refused connections, not
    one per message."""
    peer = LimitedPeer(max_sessions=1, delay=0.05)
    port = await nursery.start(peer.run, HOST)
    srv = await start_mta(relayhost=f"[{HOST}]:{port}")
    for i in range(40):
        await send(srv, "a@client.example", [f"r{i}@far.example"])
    await wait_for(lambda: len(peer.recipients()) == 40, timeout=30)
    await wait_empty(srv)
    print(f"\n40 messages to a 1-session peer: {peer.sessions} sessions, {peer.refused} refused")
    assert peer.most_sessions == 1
    assert peer.refused <= 8
