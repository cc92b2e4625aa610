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


async def test_a_flush_trigger_the_full_socket_refused_is_sent_once_there_is_room() -> None:
    """A wake-up the full socket refuses adds nothing (one is pending), but a flush
    (ETRN, ``queue flush``) was dropped with it: the site stayed dead.  It is owed now,
    and ``watch`` sends it (and a wake-up) when the qmgr has read the others."""
    sending, receiving = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiving.setblocking(False)
    trigger = QmgrTrigger(sending)
    while True:  # the socket's buffer full of wake-ups
        try:
            sending.send(b"W")
        except BlockingIOError:
            break
    trigger.forget_dead()
    received = b""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trigger.watch)
        with trio.fail_after(5):
            while b"F" not in received:
                await trio.lowlevel.wait_readable(receiving)
                received += receiving.recv(16)
        nursery.cancel_scope.cancel()


def test_trigger_never_blocks_when_nobody_reads() -> None:
    sending, receiving = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    trigger = QmgrTrigger(sending)
    for _ in range(100_000):  # far beyond the socket buffer: each send returns at once
        trigger.wake()
    receiving.close()
    trigger.wake()  # the reader gone: still no exception
    assert trigger.reserve() is False


# -- the client board: per-client counts and rates of all smtpd workers ----------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _workers(count: int = 2):
    from trimail.processes.clients import ClientBoard

    master = ClientBoard.create()
    clock = _Clock()
    workers = [ClientBoard(master.fd, slot) for slot in range(count)]
    for worker in workers:
        worker.clock = clock
    return master, workers, clock


def test_client_sessions_are_summed_over_workers_and_a_dead_workers_are_cleared() -> None:
    master, (one, two), _ = _workers()
    one.add("192.0.2.1", 1)
    two.add("192.0.2.1", 1)
    two.add("192.0.2.1", 1)
    one.add("192.0.2.2", 1)
    assert one.sessions("192.0.2.1") == two.sessions("192.0.2.1") == 3
    assert two.sessions("192.0.2.2") == 1 and two.sessions("192.0.2.3") == 0
    one.add("192.0.2.1", -1)
    assert two.sessions("192.0.2.1") == 2
    two.auth_failed("192.0.2.1", 600)
    master.clear(1)  # the second worker died, its sessions with it; its AUTH failures stay
    assert one.sessions("192.0.2.1") == 0 and one.sessions("192.0.2.2") == 1
    assert one.auth_failures("192.0.2.1", 600) == 1


def test_client_rate_counts_every_workers_window_until_it_expires() -> None:
    _, (one, two), clock = _workers()
    assert [one.arrived("198.51.100.7") for _ in range(3)] == [1, 2, 3]
    clock.now += 30
    assert two.arrived("198.51.100.7") == 4  # the first worker's window is 30 s old: still counts
    clock.now += 31  # the first window (61 s) has expired, the second's (31 s) has not
    assert one.arrived("198.51.100.7") == 2
    assert two.arrived("198.51.100.8") == 1


def test_client_counts_include_every_slot_in_use_however_scattered() -> None:
    """Reloads move workers to new slots: a table in use anywhere counts (the first
    and last slot included), and one never used does not."""
    from trimail.processes.board import SLOTS
    from trimail.processes.clients import ClientBoard

    master = ClientBoard.create()
    boards = [ClientBoard(master.fd, slot) for slot in (0, 7, 130, SLOTS - 1)]
    for board in boards:
        board.add("192.0.2.9", 1)
        board.arrived("192.0.2.9")
    assert master._live() == [0, 7, 130, SLOTS - 1]
    assert boards[1].sessions("192.0.2.9") == 4 and boards[2].arrived("192.0.2.9") == 5
    master.clear(130)
    assert boards[0].sessions("192.0.2.9") == 3


def test_a_full_client_table_stops_counting_per_client_but_stays_bounded() -> None:
    from trimail.processes.clients import ENTRIES

    _, (one, two), _ = _workers()
    for n in range(ENTRIES + 100):  # more clients with open sessions than one worker's table holds
        one.add(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}", 1)
    counted = sum(two.sessions(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}") for n in range(ENTRIES + 100))
    assert ENTRIES * 0.9 < counted <= ENTRIES  # nearly every entry used, none twice, the rest not counted
    for n in range(ENTRIES + 100):  # the sessions end: their entries are free again
        one.add(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}", -1)
    assert one.arrived("203.0.113.9") == 1


def test_auth_failures_are_summed_over_workers_within_their_window() -> None:
    _, (one, two), clock = _workers()
    one.auth_failed("192.0.2.9", 600)
    two.auth_failed("192.0.2.9", 600)
    two.auth_failed("192.0.2.9", 600)
    assert one.auth_failures("192.0.2.9", 600) == 3 and one.auth_failures("192.0.2.10", 600) == 0
    clock.now += 601
    assert two.auth_failures("192.0.2.9", 600) == 0
    one.auth_failed("192.0.2.9", 600)
    assert two.auth_failures("192.0.2.9", 600) == 1


# -- the session board: counts of all smtpd workers, and whose turn it is to accept ----------------


def _session_boards(count: int):
    from trimail.processes.board import SessionBoard

    master = SessionBoard.create()
    for slot in range(count):
        master.hand_out(slot)  # as the supervisor does before it starts the worker
    return master, [SessionBoard(master.fd, slot) for slot in range(count)]


def test_a_lone_client_stays_with_the_first_worker_even_before_its_last_session_ended() -> None:
    master, (first, second) = _session_boards(2)
    assert first.my_turn() and not second.my_turn()
    first.add(1)  # the client's last session, not yet torn down when it connects again
    assert first.my_turn() and not second.my_turn()
    assert master.total() == 1


def test_under_load_a_worker_ahead_of_the_least_busy_waits_its_turn() -> None:
    master, workers = _session_boards(3)
    workers[0].add(5)
    workers[1].add(3)
    workers[2].add(4)
    assert [w.my_turn() for w in workers] == [False, True, True]
    workers[1].add(2)  # 5, 5, 4: all within one of the least busy
    assert [w.my_turn() for w in workers] == [True, True, True]
    assert master.total() == 14


def test_light_load_gives_the_turn_to_the_first_worker_only() -> None:
    master, workers = _session_boards(3)
    workers[1].add(1)
    workers[2].add(1)  # 2 sessions on 3 workers: light
    assert [w.my_turn() for w in workers] == [True, False, False]


def test_a_worker_that_stopped_accepting_still_counts_but_never_has_the_turn() -> None:
    master, (old, new) = _session_boards(2)
    old.add(2)
    old.stop_accepting()  # retiring after a reload: its sessions go on
    assert new.my_turn() and not old.my_turn()
    assert master.total() == 2
    master.clear(0)  # it died: its sessions died with it
    assert master.total() == 0 and new.my_turn()


def test_readers_scan_the_slots_ever_handed_out() -> None:
    """The master notes the highest slot it handed out, and workers count up to it
    only (the supervisor hands out the lowest free slot, so that stays small)."""
    from trimail.processes.board import SessionBoard

    master = SessionBoard.create()
    assert master.total() == 0 and master._high() == 0
    master.hand_out(5)
    late = SessionBoard(master.fd, 5)
    late.add(3)
    early = SessionBoard(master.fd, 0)
    master.hand_out(0)  # a lower slot does not lower the mark
    early.add(1)
    assert master._high() == 6 and master.total() == 4 and early.total() == 4
    assert late.my_turn() is False and early.my_turn() is True  # light load: the first slot


def test_the_others_wait_longer_under_light_load_when_the_worker_whose_turn_it_is_is_idle() -> None:
    """The accept delay: none for the worker whose turn it is; under light load the
    others wait 10 ms (that worker is idle and takes it at once, and the others are
    not woken by every connection), under load 1 ms."""
    from trimail.processes.board import DEFER_LIGHT, DEFER_UNDER_LOAD

    master, (first, second) = _session_boards(2)
    assert (first.accept_delay(), second.accept_delay()) == (0.0, DEFER_LIGHT)
    first.add(4)
    second.add(1)  # 5 sessions on 2 workers: load, and the first is ahead
    assert (first.accept_delay(), second.accept_delay()) == (DEFER_UNDER_LOAD, 0.0)
    assert DEFER_UNDER_LOAD < DEFER_LIGHT


def test_under_load_every_worker_not_ahead_takes_connections_at_once() -> None:
    master, workers = _session_boards(2)
    workers[0].add(6)
    workers[1].add(5)  # 11 sessions on 2 workers: both within one of the least busy
    assert [w.my_turn() for w in workers] == [True, True]
    workers[0].add(1)  # 7 against 5: the one ahead waits its turn
    assert [w.my_turn() for w in workers] == [False, True]
