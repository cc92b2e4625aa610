"""Client addresses as the policy compares them: an IPv4-mapped IPv6 address
(``::ffff:192.0.2.1``, what a dual-stack listener reports) is its IPv4 address."""

from __future__ import annotations

import functools
import ipaddress


@functools.lru_cache(maxsize=4096)  # each session asks for its client's several times; the objects never change
def client_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """*address* as an IP address, unmapped; None when it is not one."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped:
        return ip.ipv4_mapped
    return ip


def in_networks(address: str, networks: list) -> bool:
    """Is the client *address* in one of *networks* (ip_network objects)?"""
    ip = client_ip(address)
    return ip is not None and any(ip.version == net.version and ip in net for net in networks)
