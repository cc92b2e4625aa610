"""The differential suite's two loopback blocks: the first (``127.0.45`` by default)
holds the DNS server, the sink, both MTAs and the clients inside ``mynetworks``; the
second (``127.0.46``) the clients outside.  ``TRIMAIL_DIFF_NET="127.0.145,127.0.146"``
moves both, so that two runs of the suite on one machine (the DNS server must bind
port 53 of its address) do not meet.  Without it, each xdist worker of a run has
its own two blocks (conftest.py starts one pair of MTAs per worker: test files of
this suite on two workers at once must not meet either).
"""

from __future__ import annotations

import os

# the blocks of xdist workers gw0, gw1, ... (gw0's, or no xdist: the suite's first ones)
_WORKER_NETS = ["127.0.45,127.0.46", "127.0.145,127.0.146", "127.0.245,127.0.246", "127.0.155,127.0.156",
                "127.0.165,127.0.166", "127.0.175,127.0.176", "127.0.185,127.0.186", "127.0.195,127.0.196"]


def _default() -> str:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    index = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0
    return _WORKER_NETS[index % len(_WORKER_NETS)]


INSIDE_NET, OUTSIDE_NET = (part.strip() for part in os.environ.get("TRIMAIL_DIFF_NET", _default()).split(","))


def inside(host: int) -> str:
    return f"{INSIDE_NET}.{host}"


def outside(host: int) -> str:
    return f"{OUTSIDE_NET}.{host}"


def reverse(address: str) -> str:
    """The address's labels reversed, as a PTR or DNSBL name begins."""
    return ".".join(reversed(address.split(".")))
