"""The differential suite's two loopback blocks: the first (``127.0.45`` by default)
holds the DNS server, the sink, both MTAs and the clients inside ``mynetworks``; the
second (``127.0.46``) the clients outside.  ``TRIMAIL_DIFF_NET="127.0.145,127.0.146"``
moves both, so that two runs of the suite on one machine (the DNS server must bind
port 53 of its address) do not meet.
"""

from __future__ import annotations

import os

INSIDE_NET, OUTSIDE_NET = (part.strip() for part in
                           os.environ.get("TRIMAIL_DIFF_NET", "127.0.45,127.0.46").split(","))


def inside(host: int) -> str:
    return f"{INSIDE_NET}.{host}"


def outside(host: int) -> str:
    return f"{OUTSIDE_NET}.{host}"


def reverse(address: str) -> str:
    """The address's labels reversed, as a PTR or DNSBL name begins."""
    return ".".join(reversed(address.split(".")))
