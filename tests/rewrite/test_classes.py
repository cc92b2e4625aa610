"""Address classes (Postfix's trivial-rewrite): local, virtual alias, virtual mailbox,
relay, default (remote), invalid; the domain lists must be disjoint; and the router
sends each class to its own transport."""

from __future__ import annotations

import pytest

from tests.conftest import write_main_cf
from trimail import config as configuration
from trimail.delivery.route import Route, Router
from trimail.rewrite import Settings, resolve

SETTINGS = Settings(local_domains=frozenset({"gw.example"}), relay_domains=frozenset({"corp.example"}),
                    virtual_alias_domains=frozenset({"alias.example"}),
                    virtual_mailbox_domains=frozenset({"mbox.example"}))


@pytest.mark.parametrize("address, klass", [
    ("u@gw.example", "local"),
    ("u", "local"),
    ("u@alias.example", "virtual_alias"),
    ("U@ALIAS.EXAMPLE.", "virtual_alias"),
    ("u@sub.alias.example", "remote"),  # virtual domain lists match whole names only (Postfix)
    ("u@mbox.example", "virtual_mailbox"),
    ("u@sub.mbox.example", "remote"),
    ("u@corp.example", "relay"),
    ("u@sub.corp.example", "relay"),  # parent_domain_matches_subdomains includes relay_domains
    ("u@outside.example", "remote"),
    ("u@mbox.example@gw.example", "virtual_mailbox"),
    ("alias.example!u@gw.example", "virtual_alias"),
    ("u@", "invalid"),
])
def test_each_domain_list_is_its_own_class(address, klass):
    assert resolve(address, SETTINGS).klass == klass


def test_a_domain_in_two_lists_takes_postfixs_order_and_is_reported():
    both = Settings(local_domains=frozenset({"a.example"}), relay_domains=frozenset({"b.example", "c.example"}),
                    virtual_alias_domains=frozenset({"a.example", "b.example", "d.example"}),
                    virtual_mailbox_domains=frozenset({"c.example", "d.example"}))
    # local first, then virtual alias, then virtual mailbox, then relay (resolve.c)
    assert resolve("u@a.example", both).klass == "local"
    assert resolve("u@b.example", both).klass == "virtual_alias"
    assert resolve("u@c.example", both).klass == "virtual_mailbox"
    assert resolve("u@d.example", both).klass == "virtual_alias"
    assert sorted(both.overlaps()) == [
        "do not list domain a.example in BOTH mydestination and virtual_alias_domains",
        "do not list domain b.example in BOTH virtual_alias_domains and relay_domains",
        "do not list domain c.example in BOTH virtual_mailbox_domains and relay_domains",
        "do not list domain d.example in BOTH virtual_alias_domains and virtual_mailbox_domains",
    ]
    assert SETTINGS.overlaps() == []


def _router(tmp_path, **params) -> Router:
    params = {"mydestination": "gw.example", "relay_domains": "corp.example",
              "virtual_alias_domains": "alias.example", "virtual_mailbox_domains": "mbox.example", **params}
    return Router(configuration.load(write_main_cf(tmp_path, **params)))


def test_the_router_sends_each_class_to_its_transport(tmp_path):
    router = _router(tmp_path)
    assert router.route("u@gw.example") == Route("local", "mx.test.example", mx=False)  # local:$myhostname
    assert router.route("u@mbox.example") == Route("virtual", "mbox.example", mx=False)
    assert router.route("u@corp.example") == Route("relay", "corp.example")
    assert router.route("u@outside.example") == Route("smtp", "outside.example")
    # what is left in a virtual alias domain after virtual_alias_maps is unknown (Postfix: error transport)
    assert router.route("u@alias.example") == Route("error", "5.1.1 User unknown in virtual alias table", mx=False)


def test_class_transports_are_configurable_and_relayhost_covers_relay_and_default(tmp_path):
    router = _router(tmp_path, relay_transport="smtp:[10.0.0.1]:2525", default_transport="smtp",
                     virtual_transport="error:no virtual here", local_transport="local:gw.example",
                     relayhost="[192.0.2.9]")
    assert router.route("u@corp.example") == Route("smtp", "10.0.0.1", 2525, mx=False)
    assert router.route("u@outside.example") == Route("smtp", "192.0.2.9", mx=False)
    assert router.route("u@mbox.example") == Route("error", "no virtual here", mx=False)
    assert router.route("u@gw.example") == Route("local", "gw.example", mx=False)
    plain = _router(tmp_path, relayhost="[192.0.2.9]")
    assert plain.route("u@corp.example") == Route("relay", "192.0.2.9", mx=False)


def test_transport_maps_override_every_class_but_virtual_alias(tmp_path):
    router = _router(tmp_path, transport_maps="inline:{ *=smtp:[192.0.2.7] }")
    for address in ["u@gw.example", "u@mbox.example", "u@corp.example", "u@outside.example"]:
        assert router.route(address) == Route("smtp", "192.0.2.7", mx=False), address
    assert router.route("u@alias.example").transport == "error"


@pytest.mark.parametrize("value", ["$virtual_alias_maps", "hash:/etc/postfix/virtual", "/etc/domains"])
def test_a_virtual_domain_list_of_tables_is_refused_not_silently_empty(tmp_path, value):
    params = {"virtual_alias_maps": "inline:{ a@b.example=c }"}
    with pytest.raises(configuration.ConfigError, match="only domain names"):
        configuration.load(write_main_cf(tmp_path, virtual_alias_domains=value, **params))
    with pytest.raises(configuration.ConfigError, match="only domain names"):
        configuration.load(write_main_cf(tmp_path, virtual_mailbox_domains=value.replace("alias", "mailbox"),
                                         virtual_mailbox_maps="inline:{ a@b.example=c }"))


def test_serve_logs_postfixs_warning_for_a_domain_in_two_lists(tmp_path, serve_process):
    proc = serve_process(write_main_cf(tmp_path, master_service_disable="", mydestination="gw.example",
                                       virtual_alias_domains="gw.example"))
    proc.wait_log(r"warning: do not list domain gw\.example in BOTH mydestination and virtual_alias_domains")


@pytest.mark.parametrize(("subdomains", "expected"), [
    (True, {"a.example.com": "relay", "b.a.example.com": "relay", "example.com": "remote",
            "corp.example": "relay", "x.corp.example": "relay", "xcorp.example": "remote"}),
    (False, {"a.example.com": "relay", "b.a.example.com": "relay", "example.com": "remote",
             "corp.example": "relay", "x.corp.example": "remote", "xcorp.example": "remote"}),
])
def test_relay_domains_match_as_postfixs_domain_lists(subdomains, expected):
    """`.parent` always matches the names below parent (and not parent itself);
    `parent` matches them only when parent_domain_matches_subdomains names
    relay_domains (Postfix's default)."""
    settings = Settings(local_domains=frozenset(), relay_domains=frozenset({".example.com", "corp.example"}),
                        relay_subdomains=subdomains)
    assert {domain: resolve(f"u@{domain}", settings).klass for domain in expected} == expected


def test_a_filter_without_nexthop_never_lets_local_mail_past_the_filter(tmp_path):
    """FILTER smtp: (no nexthop) for a recipient delivered locally: Postfix sends it to
    the recipient's domain (empty default_filter_nexthop), not to the local mailbox."""
    router = _router(tmp_path)
    assert router.route("u@gw.example", "smtp:") == Route("smtp", "gw.example", mx=True)
    assert router.route("u@mbox.example", "smtp:") == Route("smtp", "mbox.example", mx=True)
    own = router.route("u@corp.example")  # an SMTP route: its own nexthop, through the filter's transport
    assert router.route("u@corp.example", "lmtp:") == Route("lmtp", own.nexthop, own.port, own.mx)
