"""Source routes (RFC 5321 4.1.2 A-d-l, appendix C): accepted and ignored, as Postfix
does; the route's domains may be address literals (RFC 821 allowed ``@[dotnum]``), so
the colon that ends the route is the first one outside brackets and quotes."""

from __future__ import annotations

import pytest

from trimail.rewrite import Settings, resolve
from trimail.smtp.address import AddressError, parse_path

SETTINGS = Settings(frozenset({"gw.example"}), frozenset({"internal.example"}))


@pytest.mark.parametrize("argument, address", [
    ("TO:<@a.example,@b.example:user@d.example>", "user@d.example"),
    ("TO:<@a.example:user@d.example>", "user@d.example"),
    ("TO:<@[192.0.2.1]:user@d.example>", "user@d.example"),
    ("TO:<@[IPv6:2001:db8::1]:user@d.example>", "user@d.example"),
    ("TO:<@a.example,@[IPv6:::1],@b.example:user@d.example>", "user@d.example"),
    ('TO:<@a.example:"x:y"@d.example>', '"x:y"@d.example'),
])
def test_a_source_route_is_accepted_and_dropped(argument, address):
    assert parse_path(argument, "TO:", utf8_allowed=False).address == address


def test_mail_from_with_a_source_route_is_the_plain_sender():
    assert parse_path("FROM:<@a:u@d.example>", "FROM:", utf8_allowed=False).address == "u@d.example"
    assert parse_path("FROM:<@[IPv6:::1]:u@d.example>", "FROM:", utf8_allowed=False).address == "u@d.example"


@pytest.mark.parametrize("argument", [
    "TO:<@:user@d.example>",
    "TO:<@a.example,:user@d.example>",
    "TO:<@a..example:user@d.example>",
    "TO:<@a.example\x00:user@d.example>",
    "TO:<@[IPv6:::1:user@d.example>",
    "TO:<@a.example,b.example:user@d.example>",
])
def test_a_malformed_route_is_refused(argument):
    with pytest.raises(AddressError):
        parse_path(argument, "TO:", utf8_allowed=False)


@pytest.mark.parametrize("address, klass, where", [
    ("@a.example,@b.example:user@d.example", "remote", "user@d.example"),
    ("@[IPv6:::1]:user@outside.example", "remote", "user@outside.example"),
    ('@a.example:"x:y"@gw.example', "local", '"x:y"@gw.example'),
    ('@a.example:"x:y@outside.example"@gw.example', "remote", '"x:y"@outside.example'),
    ("@gw.example:victim@outside.example", "remote", "victim@outside.example"),
    ('"@gw.example:victim@outside.example"@gw.example', "remote", "victim@outside.example"),
    ("@gw.example:@a.example:victim@internal.example", "relay", "victim@internal.example"),
])
def test_the_resolver_ignores_the_route(address, klass, where):
    resolved = resolve(address, SETTINGS)
    assert (resolved.klass, resolved.address) == (klass, where)
