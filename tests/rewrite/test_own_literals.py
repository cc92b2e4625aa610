"""Address literals naming this host are local (Postfix's resolve_local(): "an address
literal that matches $inet_interfaces or $proxy_interfaces"); every other literal keeps
its class.  trimail's inet_interfaces are the addresses serve listens on; a wildcard
listener means every address of the host's interfaces, as Postfix's inet_interfaces = all."""

from __future__ import annotations

import ipaddress

import pytest

from tests.conftest import write_main_cf
from trimail import config as configuration
from trimail.delivery.interfaces import interface_addresses
from trimail.rewrite import Settings, resolve

OWN = Settings(frozenset({"gw.example"}), frozenset({"internal.example"}),
               own_addresses=frozenset({"127.0.0.1", "::1", "192.0.2.7"}))


@pytest.mark.parametrize("address, klass, where", [
    ("user@[127.0.0.1]", "local", "user@[127.0.0.1]"),
    ("user@[IPv6:::1]", "local", "user@[ipv6:::1]"),
    ("user@[ipv6:0:0:0:0:0:0:0:1]", "local", "user@[ipv6:0:0:0:0:0:0:0:1]"),
    ("user@[192.0.2.7]", "local", "user@[192.0.2.7]"),
    ("user@[127.0.0.2]", "remote", "user@[127.0.0.2]"),
    ("user@[192.0.2.1]", "remote", "user@[192.0.2.1]"),
    ("user@[IPv6:::2]", "remote", "user@[ipv6:::2]"),
    ("user@[IPv6:::ffff:127.0.0.1]", "remote", "user@[ipv6:::ffff:127.0.0.1]"),
    ("user@[127.0.0.001]", "remote", "user@[127.0.0.001]"),
    # a local literal resolves further, as a mydestination domain does
    ('"victim@outside.example"@[127.0.0.1]', "remote", "victim@outside.example"),
    ("outside.example!victim@[127.0.0.1]", "remote", "victim@outside.example"),
    ("victim@outside.example@[IPv6:::1]", "remote", "victim@outside.example"),
])
def test_our_own_address_literals_are_local(address, klass, where):
    resolved = resolve(address, OWN)
    assert (resolved.klass, resolved.address.lower()) == (klass, where.lower())


def test_without_own_addresses_a_literal_is_remote():
    assert resolve("user@[127.0.0.1]", Settings(frozenset({"gw.example"}))).klass == "remote"


def _settings(tmp_path, **params) -> Settings:
    return Settings.from_config(configuration.load(write_main_cf(tmp_path, **params)))


def test_the_listeners_and_proxy_interfaces_are_our_addresses(tmp_path):
    settings = _settings(tmp_path, smtpd_listen="127.0.0.1:0, [::1]:0", submission_listen="127.0.0.5:0",
                         proxy_interfaces="192.0.2.7, [2001:db8::7]")
    assert settings.own_addresses == {"127.0.0.1", "::1", "127.0.0.5", "192.0.2.7", "2001:db8::7"}


def test_a_wildcard_listener_means_every_interface_address(tmp_path):
    """Not bound here: the settings are computed from the configuration alone."""
    settings = _settings(tmp_path, smtpd_listen="0.0.0.0:25")
    assert {str(ip) for ip in interface_addresses()} <= settings.own_addresses
    assert "127.0.0.1" in settings.own_addresses
    assert resolve("user@[127.0.0.1]", settings).klass == "local"
    assert all(ipaddress.ip_address(a) for a in settings.own_addresses)
