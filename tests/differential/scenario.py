"""The one configuration both MTAs get: main.cf lines, table sources and DNS zone.

``@TABLES@`` is each MTA's own table directory (the same sources, compiled by its own
postmap/postalias), ``@SINK@`` the shared sink.  The clients:

(127.0.45 and 127.0.46 stand for the two blocks of net.py.)

- 127.0.45.5 and .6: inside ``mynetworks``; 127.0.45.30: inside but access-listed REJECT;
- 127.0.46.5, .6, .7: outside, no PTR record (``unknown``);
- 127.0.46.20-.27: outside, in the client access table (one action each);
- 127.0.46.66: listed in the RBL zone rbl.test;
- 127.0.46.77: a PTR name that resolves back (client77.remote.test).
"""

from __future__ import annotations

from tests.differential.net import INSIDE_NET, inside, outside, reverse

MAIN_CF = """\
myhostname = mx.test.example
mydomain = test.example
mydestination = $myhostname, localhost.$mydomain, localhost
mynetworks = @INSIDE_NET@.0/24
relay_domains = relay.test
relayhost = @SINK@
alias_maps = hash:@TABLES@/aliases
alias_database = hash:@TABLES@/aliases
local_recipient_maps = $alias_maps
virtual_alias_domains = virtual.test
virtual_alias_maps = hash:@TABLES@/virtual
relay_recipient_maps = hash:@TABLES@/relay_recipients
smtpd_client_restrictions = check_client_access hash:@TABLES@/client_access
smtpd_helo_restrictions = check_helo_access hash:@TABLES@/helo_access
smtpd_sender_restrictions = check_sender_access hash:@TABLES@/sender_access,
    reject_non_fqdn_sender, reject_unknown_sender_domain
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_recipient_restrictions = check_recipient_access hash:@TABLES@/recipient_access,
    reject_non_fqdn_recipient, reject_unknown_recipient_domain,
    reject_rbl_client rbl.test, reject_rhsbl_sender dbl.test
message_size_limit = 20000
smtpd_recipient_limit = 10
""".replace("@INSIDE_NET@", INSIDE_NET)

TABLES = {
    "aliases": (
        "postmaster: ops@remote.test\n"
        "info: staff@remote.test\n"
        "team: a@remote.test, b@remote.test\n"
        "abuse: postmaster\n"
    ),
    "virtual": (
        "sales@virtual.test sales-team@remote.test\n"
        "help@virtual.test info@mx.test.example\n"
    ),
    "relay_recipients": (
        "user@relay.test OK\n"
        "blocked@relay.test OK\n"
        "other@relay.test OK\n"
    ),
    "client_access": (
        f"{inside(30)} REJECT\n"
        f"{outside(20)} REJECT\n"
        f"{outside(21)} 550 Go away\n"
        f"{outside(22)} OK\n"
        f"{outside(23)} DISCARD\n"
        f"{outside(24)} HOLD\n"
        f"{outside(25)} 450 Try again later\n"
        f"{outside(26)} DEFER_IF_PERMIT Come back later\n"
        f"{outside(27)} REJECT Your network is not welcome\n"
    ),
    "helo_access": (
        "bad.helo.test REJECT\n"
        "spam.helo.test 550 5.7.1 No spammers\n"
        "ok.helo.test OK\n"
    ),
    "sender_access": (
        "spammer@client.test REJECT\n"
        "badsender.test REJECT Bad domain\n"
        "friend@client.test OK\n"
        "hold@client.test HOLD\n"
        "disc@client.test DISCARD\n"
        "later@client.test 451 4.7.1 Not now\n"
    ),
    "recipient_access": (
        "blocked@relay.test REJECT\n"
        "closed@remote.test 550 5.2.1 Mailbox disabled\n"
    ),
}

ZONE: dict = {
    "client.test": {"A": [outside(1)]},
    "remote.test": {"MX": ["10 mx.remote.test."]},
    "mx.remote.test": {"A": [inside(2)]},
    "relay.test": {"MX": ["10 mx.remote.test."]},
    "far.test": {"MX": ["10 mx.remote.test."]},
    "virtual.test": {"A": [inside(2)]},
    "badsender.test": {"A": [outside(1)]},
    "servfail.test": "SERVFAIL",
    "spam.test": {"A": [outside(1)]},
    "spam.test.dbl.test": {"A": ["127.0.1.2"], "TXT": ['"spam.test is a spam domain"']},
    f"{reverse(outside(66))}.rbl.test": {"A": ["127.0.0.2"], "TXT": ['"listed: see rbl.test"']},
    f"{reverse(outside(77))}.in-addr.arpa": {"PTR": ["client77.remote.test."]},
    "client77.remote.test": {"A": [outside(77)]},
}
