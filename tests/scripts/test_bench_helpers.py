"""The measuring parts of ``scripts/bench``: the storm sink must record what it
receives, however the bytes are split; the scale mode must run on the queue
schema and ``schedule_round`` of today and leave the queue as it found it."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import bench_scale
import storm_peers

from trimail.queue.store import Store

TRANSCRIPT = (
    b"EHLO client.example\r\n"
    b"MAIL FROM:<new-000007@storm.example> SIZE=20\r\nRCPT TO:<New@Sink.example>\r\nRCPT TO:<two@sink.example>\r\n"
    b"DATA\r\nSubject: x\r\n\r\n..stuffed\r\n.\r\n"
    b"MAIL FROM:<retry@client.example>\r\nRCPT TO:<1sink@dest.example>\r\nDATA\r\n.\r\n"
    b"MAIL FROM:<retry@client.example>\r\nRCPT TO:<1sink@dest.example>\r\nDATA\r\nbody\r\n.\r\n"
    b"QUIT\r\n"
)


class FakeTransport:
    def __init__(self) -> None:
        self.written = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True


class Counter:
    value = 0


def run_sink(chunks: list[bytes]) -> tuple[storm_peers._SinkState, FakeTransport]:
    state = storm_peers._SinkState(Counter())
    protocol = storm_peers._SinkProtocol(state)
    transport = FakeTransport()
    protocol.transport = transport  # connection_made checks for a real asyncio transport
    for chunk in chunks:
        protocol.data_received(chunk)
    return state, transport


def test_sink_records_pipelined_messages_however_split() -> None:
    whole, whole_transport = run_sink([TRANSCRIPT])
    bytewise, bytewise_transport = run_sink([TRANSCRIPT[i:i + 1] for i in range(len(TRANSCRIPT))])
    for state, transport in ((whole, whole_transport), (bytewise, bytewise_transport)):
        assert list(state.new) == ["new-000007@storm.example"]
        assert state.seen == {(b"new-000007@storm.example", b"new@sink.example"),
                              (b"retry@client.example", b"1sink@dest.example")}
        assert state.duplicates == 1 and state.counter.value == 2
        assert transport.written.count(b"250 2.0.0 Ok: queued\r\n") == 3
        assert transport.written.endswith(b"221 2.0.0 Bye\r\n") and transport.closed
    assert whole_transport.written == bytewise_transport.written


def test_scale_measures_a_round_and_rolls_it_back(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "queue")
    try:
        now = time.time()
        bench_scale.build(store, waiting=50, due=5, incoming=20, now=now)

        def states() -> dict[str, int]:
            return dict(store.db.execute("SELECT state, count(*) FROM message GROUP BY state").fetchall())

        before = states()
        figures = bench_scale.measure(store, now, batch=10, room=100, repeat=2)
        assert before == {"deferred": 55, "incoming": 20} and states() == before
        assert figures["promoted"] == 5 and figures["claimed"] == 10
        assert figures["round_batch_claimed"] == 10 and figures["round_full_claimed"] == 25
    finally:
        store.close()
