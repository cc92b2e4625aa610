"""This host's own addresses (loop detection with wildcard listeners), and the sending
side's new parameters."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from trimail.config import ConfigError
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


@pytest.mark.parametrize("name, value, words", [
    ("proxy_interfaces", "gw.example", "bad IP address 'gw.example'"),
    ("smtp_mx_address_limit", "-1", "parameter value -1 < 0"),
    ("smtp_mx_session_limit", "two", "bad numerical configuration"),
])
def test_bad_sending_side_parameters_are_refused_with_file_and_line(make_config, name, value, words):
    with pytest.raises(ConfigError) as caught:
        make_config(**{name: value})
    assert name in str(caught.value) and words in str(caught.value) and "main.cf, line " in str(caught.value)


def test_proxy_interfaces_accepts_ipv4_and_bracketed_ipv6(make_config):
    config = make_config(proxy_interfaces="192.0.2.1, [2001:db8::1]")
    assert config.proxy_interfaces == ["192.0.2.1", "2001:db8::1"]
