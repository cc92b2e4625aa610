"""The one resolver (trimail/rewrite.py): Postfix's forms, and the invariant that
matters for relay control, over generated address forms nested 0 to 30 deep."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trimail.rewrite import Resolved, Settings, _own_literal, resolve

LOCAL = frozenset({"gw.example", "localhost"})
RELAY = frozenset({"internal.example"})
VARIANTS = {
    "postfix-defaults": Settings(LOCAL, RELAY),
    "percent-hack": Settings(LOCAL, RELAY, percent_hack=True),
    "no-bangpath": Settings(LOCAL, RELAY, swap_bangpath=False),
    "no-dequote": Settings(LOCAL, RELAY, dequote=False),
    "own-literals": Settings(LOCAL, RELAY, own_addresses=frozenset({"127.0.0.1", "::1"})),
}


@pytest.mark.parametrize("address, klass, stored", [
    ("user@gw.example", "local", "user@gw.example"),
    ("USER@GW.EXAMPLE.", "local", "USER@gw.example"),
    ("user", "local", "user"),
    ("user@outside.example", "remote", "user@outside.example"),
    ("user@sub.internal.example", "relay", "user@sub.internal.example"),
    ('"user@outside.example"@gw.example', "remote", "user@outside.example"),
    ("user@outside.example@gw.example", "remote", "user@outside.example"),
    ("outside.example!user@gw.example", "remote", "user@outside.example"),
    ("user%outside.example@gw.example", "local", '"user%outside.example"@gw.example'),
    ("@gw.example,@x.example:user@outside.example", "remote", "user@outside.example"),
    ('"john smith"@outside.example', "remote", '"john smith"@outside.example'),
    ('"victim@x.io@@@@@@@@@"@localhost', "invalid", ""),
    ("!!!!!!!!!outside.example!victim@gw.example", "invalid", ""),
    ("user@", "invalid", ""),
    ("@gw.example", "invalid", ""),
    ("user@exa_mple..org", "invalid", ""),
    ("user@" + "a" * 64 + ".example", "invalid", ""),
    ("a\r\nRCPT TO:<x@evil.example>@gw.example", "invalid", ""),
])
def test_postfix_forms(address, klass, stored):
    resolved = resolve(address, VARIANTS["postfix-defaults"])
    assert resolved.klass == klass
    if klass != "invalid":
        assert resolved.address == stored.replace('"user%outside.example"', "user%outside.example")


def test_percent_hack_only_when_allowed():
    assert resolve("user%outside.example@gw.example", VARIANTS["percent-hack"]).klass == "remote"
    assert resolve("user%outside.example@gw.example", VARIANTS["postfix-defaults"]).klass == "local"


DOMAINS = ["gw.example", "GW.EXAMPLE.", "localhost", "internal.example", "sub.internal.example",
           "outside.example", "[192.0.2.1]", "[127.0.0.1]", "[IPv6:::1]", "[IPv6:2001:db8::1]", "", "x..y", "outside.example.", "virt.example", "VIRT.example."]
LOCALS = ["user", "victim", "", "a.b", "post master", "x!y", "p%q", "@", "!", "%", ":", "\"", "."]


def _wrap(inner: str, how: str, domain: str) -> str:
    if how == "at":
        return f"{inner}@{domain}"
    if how == "quoted":
        return '"' + inner.replace("\\", "\\\\").replace('"', '\\"') + f'"@{domain}'
    if how == "bang":
        return f"{domain}!{inner}"
    if how == "percent":
        return f"{inner}%{domain}"
    if how == "route":
        return f"@{domain}:{inner}"
    if how == "routes":  # an A-d-l of two hops (RFC 5321 4.1.2)
        return f"@{domain},@[IPv6:::1]:{inner}"
    return inner + "."


forms = st.builds(
    lambda base, steps: _apply(base, steps),
    st.sampled_from(LOCALS),
    st.lists(st.tuples(st.sampled_from(["at", "quoted", "bang", "percent", "route", "routes", "dot"]),
                       st.sampled_from(DOMAINS)), min_size=0, max_size=30),
)


def _apply(base: str, steps: list[tuple[str, str]]) -> str:
    for how, domain in steps:
        base = _wrap(base, how, domain)
    return base


def _route_is(resolved: Resolved, config: Settings) -> None:
    """The stored address routes where the relay decision said it goes."""
    stored = resolved.address
    domain = stored.rpartition("@")[2].lower().rstrip(".") if "@" in stored else ""
    assert domain == resolved.domain, (stored, resolved)
    if resolved.klass == "local":
        assert domain == "" or domain in config.local_domains or _own_literal(domain, config)
    elif resolved.klass == "relay":
        assert domain in config.relay_domains or any(domain.endswith("." + d) for d in config.relay_domains)
    # and the stored address, resolved again, goes to the same place (nothing left to rewrite)
    again = resolve(stored, config)
    assert (again.klass, again.domain) == (resolved.klass, resolved.domain), (stored, resolved, again)


@pytest.mark.parametrize("variant", list(VARIANTS))
@settings(max_examples=3000, deadline=None)
@given(address=forms)
def test_an_authorized_address_is_stored_with_a_local_or_relay_route(variant, address):
    config = VARIANTS[variant]
    resolved = resolve(address, config)
    assert resolved.klass in ("local", "relay", "remote", "invalid")
    if resolved.klass in ("local", "relay"):
        _route_is(resolved, config)


@settings(max_examples=2000, deadline=None)
@given(st.text(max_size=300))
def test_resolve_never_raises(text):
    resolve(text, VARIANTS["postfix-defaults"])


# The outside client's whole path, in three configurations: the relay decision
# (Policy.authorized_destination), the unknown-user check (trimail/unlisted.py), the
# stored form (rewrite.Resolved.stored), virtual_alias_maps (cleanup) and the real
# router.  Invariant: whatever would get 250 is stored with a local route or a route
# to a domain we relay for.  31 depths x 3 configurations x 100 examples = 9,300
# addresses per CI run (a few seconds).
CONFIGURATIONS = {
    "default": {"alias_maps": "inline:{ user=root }"},  # proxy:unix:passwd.byname $alias_maps
    "empty": {"local_recipient_maps": ""},  # every local name accepted (Postfix's documented setting)
    "catch-all": {"local_recipient_maps": "", "virtual_alias_domains": "virt.example",
                  "virtual_alias_maps": "inline:{ @gw.example=postmaster@gw.example, "
                                        "@virt.example=postmaster@gw.example }"},
}
STEP = st.tuples(st.sampled_from(["at", "quoted", "bang", "percent", "route", "routes", "dot"]), st.sampled_from(DOMAINS))


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    from tests.conftest import write_main_cf
    from trimail import config as configuration
    from trimail.delivery.route import Router
    from trimail.unlisted import RecipientTables

    built = {}
    for name, params in CONFIGURATIONS.items():
        path = write_main_cf(tmp_path_factory.mktemp(name), myhostname="gw.example", mydestination="gw.example, "
                             "localhost", relay_domains="internal.example", **params)
        config = configuration.load(path)
        built[name] = (config, Settings.from_config(config), RecipientTables(config), Router(config))
    return built


def _outside_client_250(address: str, pipeline) -> list[str]:
    """The recipients stored and routed when an outside client gets 250, else []."""
    from trimail import rewrite
    from trimail.cleanup.rewrite import virtual_expand
    from trimail.maps import TableError

    _config, settings, tables, _router = pipeline
    resolved = resolve(address, settings)
    if resolved.klass not in rewrite.AUTHORIZED:  # 501 invalid, or 450 Relay access denied
        return []
    try:
        found = tables._class_tables(resolved)
        if found is not None and tables._missing(resolved, found[1], tables.tables("virtual_alias_maps")):
            return []  # 550 User unknown
    except (TableError, ValueError):
        return []  # 451 Temporary lookup failure
    return virtual_expand([resolved.stored(address)], tables.tables("virtual_alias_maps"))


@pytest.mark.parametrize("configuration", list(CONFIGURATIONS))
@pytest.mark.parametrize("depth", range(31))
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_an_outside_client_250_is_stored_with_a_local_or_relay_route(pipelines, configuration, depth, data):
    base = data.draw(st.sampled_from(LOCALS))
    address = _apply(base, data.draw(st.lists(STEP, min_size=depth, max_size=depth)))
    _config, settings_, _tables, router = pipelines[configuration]
    for stored in _outside_client_250(address, pipelines[configuration]):
        route = router.route(stored)
        final = resolve(stored, settings_)
        assert route.transport == "local" or (route.transport == "relay" and final.klass == "relay"), \
            (address, stored, route)
        if route.transport == "relay":
            assert final.domain == "internal.example" or final.domain.endswith(".internal.example")
