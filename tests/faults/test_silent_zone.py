"""A recipient domain whose DNS never answers, against a real ``trimail serve``: the
workers of destinations waiting on their MX lookups hold no delivery agent's slot
(``default_process_limit``), so mail to a healthy destination is not held up behind
them (red team 39's lead: one message to 1,000 names of a silent wildcard zone
delayed good mail about 108 s, every slot held by a worker waiting 10 s for DNS),
nor through the resolver's turns (``dns_concurrency_limit``, shared out by zone).

A DNS server in a thread (tests/faults/hostile_dns.py) never answers any name of
the zone; the healthy destination is a sink on loopback.  Every address is in
127.0.100.0/24; ports are picked free at run time."""

from __future__ import annotations

import time

from tests.delivery.outbound_peer import ScriptedPeer
from tests.faults.conftest import Daemon, banner, send, trio_thread, wait_until
from tests.faults.hostile_dns import HostileDns

HOST = "127.0.100.1"
DNS_HOST = "127.0.100.53"
SINK_HOST = "127.0.100.25"
SILENT = "silent.example"


def good_mail_delay(daemon, names: int, process_limit: int, *, via_mx: bool = False,
                    within: float = 60, **params: object) -> tuple[float, Daemon]:
    """Send one message to *names* names of the silent zone, wait until their workers
    are in their lookups, then send one to a healthy sink (through its MX lookup with
    *via_mx*, else to its address); seconds from that message's 250 to the sink's
    having it (AssertionError past *within*).  *params*: more main.cf settings."""
    sink = ScriptedPeer()
    with (trio_thread((sink.run, SINK_HOST)) as (sink_port,),
          HostileDns(DNS_HOST, a={"good.example": [SINK_HOST]}, silent_zone=SILENT) as dns):
        nexthop = f"good.example:{sink_port}" if via_mx else f"[{SINK_HOST}]:{sink_port}"
        d = daemon(smtpd_listen=f"{HOST}:0", dns_nameservers=f"{DNS_HOST}:{dns.port}",
                   default_process_limit=process_limit, transport_maps=f"inline:{{ good.example=smtp:{nexthop} }}",
                   **params)
        send(d.port, [f"r@d{i}.{SILENT}" for i in range(names)], host=HOST)

        def silent_names_asked() -> int:
            return sum(1 for name in list(dns.asked) if name.endswith("." + SILENT))

        # the silent destinations' workers are waiting for their MX answers, as many as
        # there are slots (before the change, each of them held one) or as the zone may
        # have DNS turns (three quarters of dns_concurrency_limit's)
        turns = int(str(params.get("dns_concurrency_limit", 100)))
        wait_until(lambda: silent_names_asked() >= min(names, process_limit, turns - turns // 4), timeout=20)
        sent = time.monotonic()
        send(d.port, ["r@good.example"], host=HOST)
        wait_until(lambda: len(sink.received) == 1, timeout=within)
        return time.monotonic() - sent, d


def test_a_zone_that_never_answers_holds_no_slot_from_a_healthy_destination(daemon):
    """Two slots and six destinations whose MX lookups never answer (each waits its
    10 s): the good message, queued after them, waited 32 s for a slot (three rounds
    of their lookups)."""
    delay, d = good_mail_delay(daemon, names=6, process_limit=2, within=5)
    assert delay < 5
    assert d.alive and banner(d.port, HOST).startswith("220 ")


def test_a_zone_that_never_answers_takes_no_dns_turn_from_a_healthy_destination(daemon):
    """The same through the healthy destination's MX lookup (not yet cached), with 4
    dns_concurrency_limit turns: the silent zone's lookups held them all, and the good
    one waited about 10 s for one of theirs to time out; they take three now."""
    delay, d = good_mail_delay(daemon, names=6, process_limit=2, via_mx=True, within=5, dns_concurrency_limit=4)
    assert delay < 5
    assert d.alive and banner(d.port, HOST).startswith("220 ")
