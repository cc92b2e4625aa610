"""This host's own addresses (loop detection with wildcard listeners)."""

from __future__ import annotations

import ipaddress
import socket

from trimail.delivery.interfaces import OwnAddresses, interface_addresses


def test_all_of_127_0_0_0_8_and_ipv6_loopback_are_mine():
    own = OwnAddresses(reader=lambda: set())
    assert own.is_mine(ipaddress.ip_address("127.45.6.7"))
    assert own.is_mine(ipaddress.ip_address("::ffff:127.0.0.9"))
    assert not own.is_mine(ipaddress.ip_address("192.0.2.99"))


def test_the_interface_list_holds_the_source_address_of_the_default_route():
    found = interface_addresses()
    assert ipaddress.ip_address("::1") in found
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.123", 9))
        except OSError:
            return  # no route off this host: nothing more to compare
        assert ipaddress.ip_address(probe.getsockname()[0]) in found


def test_the_list_is_read_once_and_cached():
    calls = []
    own = OwnAddresses(reader=lambda: calls.append(1) or {ipaddress.ip_address("192.0.2.5")})
    assert own.is_mine(ipaddress.ip_address("192.0.2.5")) and own.is_mine(ipaddress.ip_address("192.0.2.5"))
    assert calls == [1]
