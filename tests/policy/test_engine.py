"""The restriction registry: every name the configuration accepts has a handler that
does something observable, and a name without one is refused (issue 14, section 2).

The walk runs the real engine (``Policy.check``) against a real DNS server on
loopback; each registered name has a scenario below in which it must change the
outcome (a reply, a permit that beats the ``reject`` after it, or a warning).
A name added to the registry without a scenario fails ``test_every_name_has_a_scenario``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import trio

from tests.conftest import write_main_cf
from tests.dnsserver import run_dns_server
from trimail import config as configuration
from trimail.net.dns import Resolver
from trimail.policy import engine
from trimail.policy.restrictions import Policy, Request, Verdict, parse_list
from trimail.unlisted import Unlisted

ZONE = {
    "good.example": {"MX": ["10 mx.good.example."]},
    "mx.good.example": {"A": ["127.0.0.9"]},
    "2.0.0.127.in-addr.arpa": {"PTR": ["client.good.example."]},
    "client.good.example": {"A": ["127.0.0.2"]},
    "3.0.0.127.in-addr.arpa": {"PTR": ["liar.example."]},
    "liar.example": {"A": ["10.9.9.9"]},
    "2.0.0.127.zen.example": {"A": ["127.0.0.2"]},
    "2.0.0.127.wl.example": {"A": ["127.0.0.2"]},
    "bad.example.rhsbl.example": {"A": ["127.0.0.2"]},
    "badhelo.example.rhsbl.example": {"A": ["127.0.0.2"]},
    "client.good.example.rhsbl.example": {"A": ["127.0.0.2"]},
}


def rejected(code: int, text: str = "") -> Callable[[Verdict], bool]:
    return lambda v: v.reply is not None and v.reply.code == code and text in str(v.reply.text)


def permitted(v: Verdict) -> bool:
    return v.reply is None  # the "reject" after the name did not run


@dataclasses.dataclass
class Scenario:
    tokens: str
    expect: Callable[[Verdict], bool]
    request: dict = dataclasses.field(default_factory=dict)
    unlisted: bool = False


SCENARIOS = {
    "permit": Scenario("permit, reject", permitted),
    "reject": Scenario("reject", rejected(554, "Access denied")),
    "check_etrn_access": Scenario("check_etrn_access inline:{back.example=REJECT}, permit",
                                  rejected(554, "<a.back.example>: Etrn command rejected"),
                                  {"etrn": "a.back.example"}),
    "defer": Scenario("defer", rejected(450, "Access denied")),
    "defer_if_permit": Scenario("defer_if_permit, permit", rejected(450, "defer_if_permit requested")),
    "defer_if_reject": Scenario("defer_if_reject, reject", rejected(450, "defer_if_reject requested")),
    "warn_if_reject": Scenario("warn_if_reject, reject", lambda v: v.reply is None and bool(v.reject_warnings)),
    "sleep": Scenario("sleep 1, reject", rejected(554)),  # and the clock moved: see the test
    "reject_unauth_pipelining": Scenario("reject_unauth_pipelining", rejected(503), {"pipelined": True}),
    "reject_plaintext_session": Scenario("reject_plaintext_session", rejected(450, "Session encryption")),
    "reject_multi_recipient_bounce": Scenario("reject_multi_recipient_bounce", rejected(550, "Multi-recipient"),
                                              {"sender": "", "recipient_count": 1}),
    "check_policy_service": Scenario("check_policy_service inet:127.0.0.1:1", rejected(451)),
    "permit_mynetworks": Scenario("permit_mynetworks, reject", permitted),
    "permit_sasl_authenticated": Scenario("permit_sasl_authenticated, reject", permitted,
                                          {"sasl_username": "alice"}),
    "permit_inet_interfaces": Scenario("permit_inet_interfaces, reject", permitted,
                                       {"client_address": "127.0.0.1"}),
    "permit_tls_clientcerts": Scenario("permit_tls_clientcerts, reject", permitted,
                                       {"tls": True, "client_cert_fingerprint": "AB-CD-EF"}),
    "reject_unknown_reverse_client_hostname": Scenario("reject_unknown_reverse_client_hostname",
                                                       rejected(450, "reverse hostname"),
                                                       {"client_address": "127.0.0.4"}),
    "reject_unknown_client_hostname": Scenario("reject_unknown_client_hostname", rejected(450, "hostname"),
                                               {"client_address": "127.0.0.3"}),
    "check_client_access": Scenario("check_client_access inline:{127.0.0.9=REJECT}", rejected(554)),
    "check_reverse_client_hostname_access": Scenario(
        "check_reverse_client_hostname_access inline:{liar.example=REJECT}",
        rejected(554, "<liar.example>: Client host rejected"), {"client_address": "127.0.0.3"}),
    "reject_rbl_client": Scenario("reject_rbl_client zen.example", rejected(554, "zen.example"),
                                  {"client_address": "127.0.0.2"}),
    "reject_rhsbl_client": Scenario("reject_rhsbl_client rhsbl.example", rejected(554, "rhsbl.example"),
                                    {"client_address": "127.0.0.2"}),
    "permit_dnswl_client": Scenario("permit_dnswl_client wl.example, reject", permitted,
                                    {"client_address": "127.0.0.2"}),
    "check_helo_access": Scenario("check_helo_access inline:{client.good.example=REJECT}", rejected(554)),
    "reject_non_fqdn_helo_hostname": Scenario("reject_non_fqdn_helo_hostname", rejected(504), {"helo": "host"}),
    "reject_invalid_helo_hostname": Scenario("reject_invalid_helo_hostname", rejected(501), {"helo": "bad!host"}),
    "reject_unknown_helo_hostname": Scenario("reject_unknown_helo_hostname", rejected(450, "Host not found"),
                                             {"helo": "nohost.example"}),
    "reject_rhsbl_helo": Scenario("reject_rhsbl_helo rhsbl.example", rejected(554), {"helo": "badhelo.example"}),
    "check_sender_access": Scenario("check_sender_access inline:{a@good.example=REJECT}", rejected(554)),
    "reject_non_fqdn_sender": Scenario("reject_non_fqdn_sender", rejected(504), {"sender": "a@host"}),
    "reject_unknown_sender_domain": Scenario("reject_unknown_sender_domain", rejected(450, "Domain not found"),
                                             {"sender": "a@missing.example"}),
    "reject_rhsbl_sender": Scenario("reject_rhsbl_sender rhsbl.example", rejected(554), {"sender": "a@bad.example"}),
    "reject_unlisted_sender": Scenario("reject_unlisted_sender", rejected(550, "User unknown"), unlisted=True),
    "reject_sender_login_mismatch": Scenario("reject_sender_login_mismatch", rejected(553, "not logged in")),
    "check_recipient_access": Scenario("check_recipient_access inline:{r@good.example=REJECT}", rejected(554)),
    "reject_unauth_destination": Scenario("reject_unauth_destination", rejected(554, "Relay access denied"),
                                          {"recipient": "r@else.example"}),
    "defer_unauth_destination": Scenario("defer_unauth_destination", rejected(450, "Relay access denied"),
                                         {"recipient": "r@else.example"}),
    "permit_auth_destination": Scenario("permit_auth_destination, reject", permitted),
    "reject_non_fqdn_recipient": Scenario("reject_non_fqdn_recipient", rejected(504), {"recipient": "r@host"}),
    "reject_unknown_recipient_domain": Scenario("reject_unknown_recipient_domain", rejected(450, "Domain not found"),
                                                {"recipient": "r@missing.example"}),
    "reject_rhsbl_recipient": Scenario("reject_rhsbl_recipient rhsbl.example", rejected(554),
                                       {"recipient": "r@bad.example"}),
    "reject_unlisted_recipient": Scenario("reject_unlisted_recipient", rejected(550, "User unknown"), unlisted=True),
    # the relayhost's port is closed: the probe cannot finish, a 450 once nothing else rejects
    "reject_unverified_recipient": Scenario("reject_unverified_recipient", rejected(450, "unverified address")),
}


def test_every_name_has_a_scenario():
    assert set(SCENARIOS) == set(engine.names())


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_every_registered_name_is_accepted_by_the_parser(name):
    tokens = SCENARIOS[name].tokens.replace(",", " ").split()
    assert parse_list(tokens, "smtpd_recipient_restrictions")[0][0] == name


async def test_no_registered_name_is_a_silent_no_op(tmp_path, nursery):
    dns_port = await nursery.start(run_dns_server, ZONE)
    path = write_main_cf(tmp_path, dns_nameservers=f"127.0.0.1:{dns_port}", mynetworks="127.0.0.1/32",
                         relay_domains="good.example", relay_clientcerts="inline:{AB-CD-EF=ok}",
                         smtpd_sender_login_maps="inline:{a@good.example=alice}", relayhost="[127.0.0.1]:1",
                         smtp_connect_timeout="2s", address_verify_poll_count="1")
    config = configuration.load(path)
    failures = []
    for name, scenario in sorted(SCENARIOS.items()):
        policy = Policy(config, Resolver(config.dns_nameservers))
        if scenario.unlisted:
            policy.unlisted = _always_unlisted
        policy.lists = {list_name: [] for list_name in policy.lists}
        policy.lists["smtpd_recipient_restrictions"] = parse_list(scenario.tokens.replace(",", " ").split(), name)
        request = Request(**{"client_address": "127.0.0.9", "client_name": "unknown", "helo": "client.good.example",
                             "protocol": "ESMTP", "sender": "a@good.example", "recipient": "r@good.example",
                             **scenario.request})
        if name == "permit_inet_interfaces":
            policy.own_addresses = (frozenset({"127.0.0.1"}), False)
        if name == "permit_mynetworks":
            request.client_address = "127.0.0.1"
        started = trio.current_time()
        with trio.fail_after(20):
            verdict = await policy.check("recipient", request)
        if not scenario.expect(verdict):
            failures.append(f"{name}: {verdict.reply}")
        if name == "sleep" and trio.current_time() - started < 1:
            failures.append("sleep: did not pause")
    assert failures == []


async def _always_unlisted(address: str) -> Unlisted:
    return Unlisted(550, "local recipient")


def test_restriction_classes_of_arguments_are_checked():
    with pytest.raises(engine.RestrictionError, match="needs a type:table argument"):
        parse_list(["check_client_access", "nocolon"], "smtpd_client_restrictions")
    with pytest.raises(engine.RestrictionError, match="needs a number of seconds"):
        parse_list(["sleep", "3600"], "smtpd_client_restrictions")


async def test_permit_inet_interfaces_with_a_wildcard_listener_knows_every_interface_address(tmp_path):
    """Postfix's inet_interfaces = all: every address of this host is ours, not only
    loopback; an address that is not the host's is not."""
    from trimail.delivery.interfaces import interface_addresses

    outside = [str(ip) for ip in interface_addresses() if ip.version == 4 and not ip.is_loopback]
    if not outside:
        pytest.skip("this host has no IPv4 address besides loopback")
    path = write_main_cf(tmp_path, smtpd_listen="0.0.0.0:2525", mynetworks="127.0.0.1/32")
    config = configuration.load(path)
    policy = Policy(config, Resolver(config.dns_nameservers))
    policy.lists = {list_name: [] for list_name in policy.lists}
    policy.lists["smtpd_recipient_restrictions"] = parse_list(["permit_inet_interfaces", "reject"], "test")
    for client, allowed in [(outside[0], True), ("127.0.0.5", True), ("203.0.113.9", False)]:
        request = Request(client_address=client, client_name="unknown", helo="h.example", protocol="ESMTP",
                          sender="a@good.example", recipient="r@good.example")
        verdict = await policy.check("recipient", request)
        assert permitted(verdict) is allowed, (client, verdict.reply)
