"""Fixtures of the test bed (tests/scheduler/test_bed.py): a fleet of peers with its DNS
server, and a real ``trimail serve`` child process resolving through it.  The other
queue-manager tests take their peers from the same fleet."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ServeProcess, write_main_cf
from tests.scheduler.fleet import Fleet


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    if os.geteuid() != 0:
        pytest.skip("the bed's peers bind port 25 of loopback addresses: needs root")
    with Fleet() as running:
        yield running


@pytest.fixture
def ephemeral_fleet() -> Iterator[Fleet]:
    """A fleet whose peers listen on ephemeral ports (reached as ``[peer.host]:peer.port``,
    e.g. by relayhost or transport_maps): no root needed."""
    with Fleet(port=0) as running:
        yield running


class Bed:
    """A serve started against the fleet: ``port``, ``queue_directory``, ``config_path``,
    ``proc`` (tests.conftest.ServeProcess)."""

    def __init__(self, proc: ServeProcess, config_path: Path, queue_directory: Path) -> None:
        self.proc = proc
        self.port = proc.port
        self.config_path = config_path
        self.queue_directory = queue_directory

    @property
    def alive(self) -> bool:
        return self.proc.proc.poll() is None


@pytest.fixture
def bed_serve(tmp_path: Path, fleet: Fleet, serve_process) -> Iterator:
    """``bed_serve(**main_cf)``: serve with its queue manager on, resolving through the
    fleet's DNS server; ``prepare(queue_directory)`` may fill the queue first."""

    def start(prepare=None, **params: object) -> Bed:
        settings: dict[str, object] = {
            "master_service_disable": "",
            "dns_nameservers": fleet.nameserver,
            "mynetworks": "127.0.0.0/8",
            "mydestination": "mx.test.example",
            "smtp_connect_timeout": "2s",
        }
        settings.update(params)
        queue_directory = tmp_path / "queue"
        config_path = write_main_cf(tmp_path, **settings)
        if prepare is not None:
            prepare(queue_directory)
        return Bed(serve_process(config_path), config_path, queue_directory)

    yield start
