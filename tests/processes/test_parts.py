"""The process model's small parts on their own: the metrics merge, the channel
framing and the qmgr trigger (real sockets, no daemon)."""

from __future__ import annotations

import socket

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from trimail.metrics import Metrics
from trimail.processes.aggregate import merge
from trimail.processes.channel import MAX_LINE, Channel, ChannelClosed
from trimail.scheduler.trigger import QmgrTrigger, receive_triggers


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_merge_adds_counters_histograms_and_gauges_and_keeps_the_earliest_created() -> None:
    one, two = Metrics(), Metrics()
    one.received.inc(3)
    two.received.inc(4)
    one.failures.labels("smtpd session").inc()
    two.failures.labels("qmgr round").inc(2)
    one.commit(3, 0.001)
    two.commit(5, 0.2)
    one.sessions.set(2)
    two.sessions.set(5)
    merged = _samples(merge([one.exposition().decode(), two.exposition().decode()]).decode())
    assert merged[("trimail_messages_received_total", ())] == 7
    assert merged[("trimail_smtpd_sessions", ())] == 7
    assert merged[("trimail_task_failures_total", (("task", "smtpd session"),))] == 1
    assert merged[("trimail_task_failures_total", (("task", "qmgr round"),))] == 2
    assert merged[("trimail_queue_commit_batch_size_count", ())] == 2
    assert merged[("trimail_queue_commit_batch_size_sum", ())] == 8
    assert merged[("trimail_queue_commit_seconds_bucket", (("le", "+Inf"),))] == 2
    assert merged[("trimail_queue_commit_seconds_bucket", (("le", "0.002"),))] == 1
    created = [_samples(m.exposition().decode())[("trimail_messages_received_created", ())] for m in (one, two)]
    assert merged[("trimail_messages_received_created", ())] == min(created)


def test_merge_escapes_label_values_it_reads_back() -> None:
    metrics = Metrics()
    metrics.failures.labels('a "quoted"\\ task\nline').inc()
    merged = merge([metrics.exposition().decode()]).decode()
    assert _samples(merged)[("trimail_task_failures_total", (("task", 'a "quoted"\\ task\nline'),))] == 1


async def test_channel_carries_json_lines_and_reports_eof() -> None:
    left, right = socket.socketpair()
    a, b = Channel(left), Channel(right)
    await a.send({"cmd": "status"})
    await a.send({"cmd": "metrics", "x": [1, 2]})
    assert await b.receive() == {"cmd": "status"}
    assert await b.receive() == {"cmd": "metrics", "x": [1, 2]}
    await a.aclose()
    with pytest.raises(ChannelClosed):
        await b.receive()


async def test_channel_refuses_garbage_and_overlong_lines() -> None:
    left, right = socket.socketpair()
    b = Channel(right)
    left.sendall(b"not json\n")
    with pytest.raises(ChannelClosed, match="JSON"):
        await b.receive()
    left.sendall(b"[1]\n")
    with pytest.raises(ChannelClosed, match="object"):
        await b.receive()
    left.setblocking(False)
    sent = 0

    async def flood() -> None:
        nonlocal sent
        chunk = b"x" * 65536
        while sent <= MAX_LINE + len(chunk):
            await trio.lowlevel.wait_writable(left)
            try:
                sent += left.send(chunk)
            except BlockingIOError:
                continue

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flood)
        with pytest.raises(ChannelClosed, match="too long"):
            await b.receive()
        nursery.cancel_scope.cancel()
    left.close()


class _Woken:
    def __init__(self) -> None:
        self.wakes = 0
        self.flushes = 0
        self.event = trio.Event()

    def wake(self) -> None:
        self.wakes += 1
        self.event.set()

    def forget_dead(self) -> None:
        self.flushes += 1


async def test_trigger_wakes_once_per_burst_and_flushes_on_f() -> None:
    sending, receiving = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    trigger = QmgrTrigger(sending)
    woken = _Woken()
    for _ in range(50):
        trigger.wake()
    trigger.forget_dead()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive_triggers, receiving, woken)
        with trio.fail_after(5):
            await woken.event.wait()
        nursery.cancel_scope.cancel()
    assert woken.wakes == 1
    assert woken.flushes == 1


def test_trigger_never_blocks_when_nobody_reads() -> None:
    sending, receiving = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    trigger = QmgrTrigger(sending)
    for _ in range(100_000):  # far beyond the socket buffer: each send returns at once
        trigger.wake()
    receiving.close()
    trigger.wake()  # the reader gone: still no exception
    assert trigger.reserve() is False
