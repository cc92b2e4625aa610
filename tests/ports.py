"""Ports for the tests that must name a port before something listens on it (a
main.cf, a Postfix master.cf, a port that must stay closed).

Asking the kernel for one (bind to port 0, then close) raced with the rest of the
suite: the kernel hands out the same ephemeral range to every ``bind(0)`` and
every outgoing connection, so between the probe's close and the test's own bind
another xdist worker's daemon could take the port.  The test's serve then failed to
listen, and the test's client spoke to the other worker's daemon: two tests
failed at once (one found its serve gone, the other counted a stranger's session).

So ``free_port`` hands out ports *below* the kernel's ephemeral range (which
nothing the suite binds to port 0, and no outgoing connection, ever gets), each
xdist worker from its own slice of it, in turn from a random start, skipping any
that is taken.  A port handed out comes back only after the rest of the slice.
"""

from __future__ import annotations

import os
import random
import socket
import threading

LOWEST = 10_000  # below: well-known and registered services' ports


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _slice() -> range:
    """This process's ports: its xdist worker's share of [LOWEST, ephemeral low)."""
    top = max(_ephemeral_low(), LOWEST + 1000)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    index = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0
    count = max(count, index + 1)
    size = (top - LOWEST) // count
    return range(LOWEST + index * size, LOWEST + (index + 1) * size)


_ports = _slice()
_next = random.randrange(len(_ports))
_lock = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on *host* that nothing listens on or is connected from now, and that
    no other test of this run is given meanwhile (see the module docstring)."""
    global _next
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with _lock:
        for _ in range(len(_ports)):
            port = _ports[_next]
            _next = (_next + 1) % len(_ports)
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                try:
                    probe.bind((host, port))  # without SO_REUSEADDR: a port in TIME_WAIT is skipped too
                except OSError:
                    continue
            return port
    raise OSError(f"no free port left in {_ports} on {host}")
