"""The queue manager's test bed (issue 15): a real ``trimail serve`` against a fleet of
real SMTP peers on loopback addresses, with a DNS server mapping hundreds of domains
onto them (tests/scheduler/fleet.py).  Each scenario prints its figures and asserts
the behaviour an ISP expects of Postfix's qmgr(8):

- every message delivered exactly once, or bounced with one correct DSN;
- concurrent connections within ``default_process_limit`` and the per-destination limit;
- healthy mail fast while a tarpit holds a backlog larger than the active queue;
- a peer allowing 2 sessions (421 beyond) gets all its mail in one run, no backoff;
- a dead site costs one cohort of connection attempts per backoff period;
- a retry storm neither starves new mail nor slows the 250 after end of data;
- ``trimail queue flush -d`` and ``ETRN`` deliver a site's backlog at once.

TRIMAIL_BED_SCALE (default 1) multiplies the destinations, the tarpit's backlog and
the storm (1 fits CI: the bed runs in under a minute on 2 cores; 5 gives the issue's
10,000-message tarpit backlog and its 50,000 retries).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections import Counter as Tally

import pytest

from tests.scheduler.fleet import (
    Client,
    Fleet,
    Received,
    Sent,
    bed_scale,
    deferred_recipients,
    figures,
    insert_queued,
    message_states,
    percentile,
    recipient_statuses,
    submit,
    submit_apart,
)


def wait_for(predicate, timeout: float, interval: float = 0.05) -> bool:
    """Poll *predicate* until it holds or *timeout* passes; True when it held (the
    caller's assertion then prints the numbers either way)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def arrivals(received: list[Received]) -> dict[str, float]:
    """Tag -> first arrival time."""
    first: dict[str, float] = {}
    for r in received:
        first.setdefault(r.tag, r.at)
    return first


def latencies(sent: list[Sent], received: list[Received]) -> list[float]:
    """Seconds from serve's 250 to the arrival at a peer, for the messages that arrived."""
    arrived = arrivals(received)
    return [arrived[s.tag] - s.acked for s in sent if s.tag in arrived]


def deliveries(received: list[Received]) -> Tally:
    """How often each (tag, recipient) arrived anywhere in the fleet."""
    return Tally((r.tag, rcpt) for r in received if r.sender for rcpt in r.recipients)


# -- 1. exactly once, or bounced correctly -------------------------------------------------


def test_every_message_is_delivered_exactly_once_or_bounced_with_one_dsn(fleet: Fleet, bed_serve):
    fast, slow = fleet.peer("fast"), fleet.peer("slow", delay=0.2)
    flaky = fleet.peer("flaky", rcpt_reply=b"451 4.3.0 come back later")  # 4xx for a while
    picky = fleet.peer("picky", rcpt_reply=lambda a: b"550 5.1.1 no such user" if a.startswith("nobody") else None)
    home = fleet.peer("home")  # the sender's domain: DSNs arrive here
    fleet.zone.domain("client.example", home)
    good = fleet.zone.domains(40, fast) + fleet.zone.domains(4, slow)
    retried = fleet.zone.domains(4, flaky)
    mixed = fleet.zone.domains(4, picky)
    bed = bed_serve(minimal_backoff_time="1s", maximal_backoff_time="2s")

    messages, expect_sent, expect_bounced = [], set(), set()
    for i in range(150):
        tag = f"m{i:04d}"
        rcpts = [f"u{i}@{good[i % len(good)]}"]
        if i % 3 == 0:
            rcpts.append(f"v{i}@{retried[i % len(retried)]}")
        if i % 5 == 0:
            rcpts.append(f"nobody{i}@{mixed[i % len(mixed)]}")  # 550 at RCPT: bounced
            rcpts.append(f"w{i}@{mixed[i % len(mixed)]}")
        if i % 25 == 0:
            rcpts.append(f"x{i}@gone.bed.test")  # NXDOMAIN: bounced
        messages.append((tag, rcpts))
        for rcpt in rcpts:
            (expect_bounced if rcpt.startswith("nobody") or "gone" in rcpt else expect_sent).add((tag, rcpt))
    submit(bed.port, messages, sessions=4)
    assert wait_for(lambda: flaky.rcpt_refused >= 10, timeout=10), f"flaky refused {flaky.rcpt_refused}"
    fleet.set(flaky, rcpt_reply=None)  # the site recovers: the deferred mail must arrive once

    def done() -> bool:
        return len(deliveries(fleet.received)) >= len(expect_sent) and \
            recipient_statuses(bed.queue_directory)["messages"] == 0

    finished = wait_for(done, timeout=30)
    received = fleet.snapshot()
    got = deliveries(received)
    dsns = [r for r in received if r.sender == ""]
    bounced_reported = Tally()
    for dsn in dsns:
        text = (dsn.data or b"").decode("utf-8", "replace")
        tags = set(re.findall(r"X-Bed-Tag: (\S+)", text))
        assert len(tags) == 1, f"a DSN names {tags or 'no'} original message(s):\n{text[:2000]}"
        [tag] = tags
        assert text.count("Action: failed") == len(re.findall(r"Final-Recipient:", text)), text[:2000]
        for address in re.findall(r"Final-Recipient: rfc822; ?(\S+)", text):
            bounced_reported[(tag, address)] += 1
    duplicates = {k: n for k, n in got.items() if n > 1}
    missing = expect_sent - set(got)
    unexpected = set(got) - expect_sent
    print(f"\nexactly-once: {len(expect_sent)} deliveries expected, {sum(got.values())} made "
          f"({len(duplicates)} duplicated, {len(missing)} missing, {len(unexpected)} unexpected); "
          f"{len(expect_bounced)} bounces expected, {len(dsns)} DSNs naming {sum(bounced_reported.values())}; "
          f"flaky refused {flaky.rcpt_refused}; queue {recipient_statuses(bed.queue_directory)}")
    assert not duplicates, f"delivered more than once: {sorted(duplicates.items())[:10]}"
    assert not missing, f"never delivered: {sorted(missing)[:10]}"
    assert not unexpected, f"delivered but should have bounced: {sorted(unexpected)[:10]}"
    assert set(bounced_reported) == expect_bounced, (
        f"bounces not reported: {sorted(expect_bounced - set(bounced_reported))[:10]}; "
        f"reported wrongly: {sorted(set(bounced_reported) - expect_bounced)[:10]}")
    assert max(bounced_reported.values()) == 1, "a bounce reported twice"
    assert len(dsns) == len({tag for tag, _ in expect_bounced}), "one DSN per message with bounces"
    assert finished, "the queue did not empty within 30 s"


# -- 2. global and per-destination limits --------------------------------------------------


def test_concurrent_connections_stay_within_default_process_limit_and_the_destination_limit(
        fleet: Fleet, bed_serve):
    shared = [fleet.peer(f"shared{i}", delay=0.05) for i in range(10)]
    domains = [d for peer in shared for d in fleet.zone.domains(int(30 * bed_scale()), peer)]  # 300
    dedicated = [fleet.peer(f"big{i}", delay=0.05) for i in range(3)]  # one destination each
    big = [fleet.zone.domain(f"big{i}.bed.test", peer) for i, peer in enumerate(dedicated)]
    messages = [(f"s{i:04d}", [f"u@{d}"]) for i, d in enumerate(domains)]
    messages += [(f"b{i:04d}", [f"u{i}@{big[i % 3]}"]) for i in range(120)]
    process_limit, destination_limit = 20, 4

    bed = bed_serve(lambda queue: insert_queued(queue, messages),  # all of it due at the start
                    default_process_limit=str(process_limit),
                    smtp_destination_concurrency_limit=str(destination_limit))
    began = time.monotonic()
    finished = wait_for(lambda: len(fleet.received) >= len(messages), timeout=15 * max(1.0, bed_scale()))
    took = time.monotonic() - began
    got = deliveries(fleet.received)
    per_destination = {p.name: p.connections_max for p in dedicated}
    print(f"\nlimits: {len(messages)} messages to {len(domains) + 3} destinations, "
          f"{sum(got.values())} delivered in {fleet.connections} connections within {took:.1f} s "
          f"({sum(got.values()) / took:.0f}/s); most connections at once: "
          f"fleet {fleet.connections_max} (default_process_limit {process_limit}), "
          f"dedicated destinations {per_destination} (limit {destination_limit})")
    assert fleet.connections_max <= process_limit
    assert max(per_destination.values()) <= destination_limit
    assert all(n == 1 for n in got.values()), f"duplicates {[k for k, n in got.items() if n > 1][:5]}"
    # 420 messages of 50 ms each through 20 agents take a few seconds; one destination
    # per agent slot for smtp_connection_cache_time_limit (2 s) each would take 40 s
    assert finished, (f"only {len(got)} of {len(messages)} delivered within {took:.0f} s: do idle cached "
                      f"connections hold default_process_limit slots other destinations wait for?")
    assert bed.alive


# -- 3. a tarpit with a backlog does not starve healthy destinations ------------------------


@pytest.mark.parametrize("active_share", [2.0, 0.25], ids=["backlog-within-active-limit",
                                                         "backlog-4x-the-active-limit"])
def test_healthy_mail_is_fast_while_a_tarpit_holds_a_backlog(fleet: Fleet, bed_serve, active_share):
    """The issue's case is 10,000 tarpit messages under the default active limit of
    20,000 (Postfix: healthy p99 0.13 s in this bed at 2,000/4,000).  A backlog 4
    times the active limit starves healthy mail in Postfix too (0 of 100 in 15 s):
    trimail's share limit is meant to do better."""
    backlog = int(2000 * bed_scale())
    active_limit = max(50, int(backlog * active_share))
    tarpit = fleet.peer("tarpit", drip=20)  # 20 bytes per second, every reply
    fleet.zone.domain("tarpit.bed.test", tarpit)
    fast = fleet.peer("fast")
    healthy = fleet.zone.domains(100, fast)
    bed = bed_serve(lambda queue: insert_queued(queue, [(f"t{i:05d}", [f"u{i}@tarpit.bed.test"])
                                                        for i in range(backlog)]),
                    qmgr_message_active_limit=str(active_limit))
    assert wait_for(lambda: tarpit.connections > 0, timeout=10), "the tarpit's backlog never went active"
    sent = submit(bed.port, [(f"h{i:04d}", [f"u@{d}"]) for i, d in enumerate(healthy)], sessions=4)
    arrived = wait_for(lambda: len(fast.received) >= len(sent), timeout=15)
    took = latencies(sent, fast.received)
    print(f"\ntarpit: backlog {backlog}, qmgr_message_active_limit {active_limit}; tarpit connections "
          f"at most {tarpit.connections_max}, delivered {len(tarpit.received)}; healthy mail "
          f"{len(fast.received)}/{len(sent)} arrived, 250 -> arrival {figures(took)}; "
          f"queue {recipient_statuses(bed.queue_directory)}")
    assert arrived, f"only {len(fast.received)} of {len(sent)} healthy messages arrived within 15 s"
    assert percentile(took, 0.99) < 3.0


# -- 4. a peer that allows 2 sessions ----------------------------------------------------------


def test_a_peer_allowing_two_sessions_gets_all_30_messages_without_a_backoff(fleet: Fleet, bed_serve):
    limited = fleet.peer("limited", session_limit=2)  # 421 4.7.0 Too many concurrent SMTP connections
    fleet.zone.domain("limited.bed.test", limited)
    messages = [(f"c{i:02d}", [f"u{i}@limited.bed.test"]) for i in range(30)]
    bed = bed_serve(lambda queue: insert_queued(queue, messages),
                    minimal_backoff_time="300s", maximal_backoff_time="300s")

    def settled() -> bool:  # everything delivered, or the rest waits for a backoff
        return len(limited.received) + len(deferred_recipients(bed.queue_directory, "limited.bed.test")) >= 30

    wait_for(settled, timeout=20)
    deferred = deferred_recipients(bed.queue_directory, "limited.bed.test")
    print(f"\nconnection-limited: {len(limited.received)}/30 delivered, {len(deferred)} deferred "
          f"(first: {deferred[0][2] if deferred else '-'}); {limited.connections} connections, "
          f"{limited.turned_away} turned away with 421, sessions at most {limited.sessions_max}")
    assert not deferred, f"{len(deferred)} of 30 wait for minimal_backoff_time"
    assert len(limited.received) == 30 and len(set(limited.tags)) == 30


# -- 5. a dead site ------------------------------------------------------------------------------


def test_a_dead_site_costs_one_cohort_of_attempts_per_backoff_period_not_one_per_message(
        fleet: Fleet, bed_serve):
    dead = fleet.peer("dead", greet=False)  # accepts, counts, never greets
    fleet.zone.domain("dead.bed.test", dead)
    fast = fleet.peer("fast")
    healthy = fleet.zone.domains(20, fast)
    backoff, cohort = 3.0, 2
    bed = bed_serve(smtp_helo_timeout="1s", minimal_backoff_time=f"{backoff:g}s",
                    maximal_backoff_time=f"{backoff:g}s", initial_destination_concurrency=str(cohort))
    started = time.monotonic()
    submit(bed.port, [(f"d{i:02d}", [f"u{i}@dead.bed.test"]) for i in range(30)], sessions=2)  # a burst
    sent = []
    for i in range(10):  # then a trickle, with healthy mail beside it
        submit(bed.port, [(f"e{i:02d}", [f"v{i}@dead.bed.test"])], sessions=1)
        sent += submit(bed.port, [(f"h{2 * i + j:02d}", [f"u@{healthy[2 * i + j]}"]) for j in range(2)],
                       sessions=2)
        time.sleep(0.3)  # the arrival rate of the trickle
    wait_for(lambda: time.monotonic() - started > 2.5 * backoff, timeout=3 * backoff)
    wait_for(lambda: len(fast.received) >= len(sent), timeout=5)
    observed = time.monotonic() - started
    periods = int(observed // backoff) + 1
    attempts = dead.connections  # within the observed periods
    wait_for(lambda: len(deferred_recipients(bed.queue_directory, "dead.bed.test")) >= 40, timeout=8)
    waiting = deferred_recipients(bed.queue_directory, "dead.bed.test")
    gaps = [round(t - started, 2) for t in dead.attempt_times]
    took = latencies(sent, fast.received)
    print(f"\ndead site: 40 messages over {observed:.1f} s (backoff {backoff:g} s, {periods} periods, "
          f"cohort {cohort}): {attempts} connection attempts at {gaps[:30]}; "
          f"{len(waiting)} deferred; healthy mail {len(fast.received)}/{len(sent)} arrived, {figures(took)}")
    held = max(dead.durations, default=0.0)
    print(f"longest connection to the dead site: {held:.2f} s (smtp_helo_timeout 1 s)")
    assert attempts <= cohort * periods, \
        f"{attempts} attempts in {periods} backoff periods (at most {cohort * periods})"
    assert len(waiting) == 40 and not dead.received
    assert held < 2.0, f"a connection that never got a greeting was held {held:.2f} s"
    assert len(fast.received) == len(sent) and percentile(took, 0.99) < 2.0


# -- 6. a retry storm ------------------------------------------------------------------------------


@pytest.mark.parametrize(("route", "workers"), [("relayhost", 0), ("mx", 0), ("relayhost", 2), ("mx", 2)],
                         ids=["relayhost-one-process", "mx-one-process", "relayhost-workers", "mx-workers"])
def test_a_retry_storm_neither_starves_new_mail_nor_slows_acknowledgements(fleet: Fleet, bed_serve, route, workers):
    """The issue's storm: due retries made due at once, new mail arriving meanwhile.
    ``relayhost``: everything through one relay, as the issue measured it.  ``mx``:
    100 destinations by MX on two peers, one connection each (default_process_limit
    = 100): new mail must not wait behind any destination's backlog (the slots go
    round-robin over destinations).

    What broke was behaviour, not speed: claims of up to 20,000 rows ran inside the
    group commit every pending ``250`` waits on (end-of-data -> 250 p99 1.4-1.6 s),
    and new mail waited behind every retry (p99 90 s).  The bounds here catch that
    with room for a busy machine (the suite runs three test processes on two cores:
    0.45 s was seen there); the issue's 100 ms goal is a speed figure, measured
    beside Postfix by ``scripts/bench --mode storm`` (docs/benchmarks.md): in this
    process the bed's peers share the two cores with serve and its client, and p99
    was 0.07-0.10 s (one process) and 0.11-0.15 s (workers) from run to run."""
    retries = int(10000 * bed_scale())  # drains for several seconds: longer than new mail may wait
    new = int(200 * bed_scale())
    peers = [fleet.peer(f"storm{i}") for i in range(2 if route == "mx" else 1)]
    domains = [d for peer in peers for d in fleet.zone.domains(50, peer)]
    due = time.time() - 1
    settings = {"relayhost": f"[{peers[0].host}]:25"} if route == "relayhost" else {}
    bed = bed_serve(lambda queue: insert_queued(
        queue, [(f"r{i:05d}", [f"u{i}@{domains[i % len(domains)]}"]) for i in range(retries)],
        state="deferred", next_attempt=due), smtpd_workers=workers, **settings)
    storm_began = time.monotonic()
    # the client in a process of its own: its end-of-data -> 250 times are serve's, not
    # those of this process, whose GIL the fleet's peers hold while they take the storm
    sent = submit_apart(bed.port, [(f"n{i:04d}", [f"new{i}@{domains[(7 * i) % len(domains)]}"])
                                   for i in range(new)], sessions=4)
    submitted = time.monotonic()

    def new_arrived() -> int:
        return sum(1 for r in fleet.received if r.tag.startswith("n"))

    arrived = wait_for(lambda: new_arrived() >= new, timeout=30 * max(1.0, bed_scale()))
    received = fleet.snapshot()
    retried = sum(1 for r in received if r.tag.startswith("r"))
    new_times = sorted(r.at for r in received if r.tag.startswith("n"))
    last_new = new_times[-1] if new_times else float("nan")
    retried_before = sum(1 for r in received if r.tag.startswith("r") and r.at <= last_new)
    took = latencies(sent, [r for r in received if r.tag.startswith("n")])
    eod = [s.eod_latency for s in sent]
    got = deliveries(received)
    print(f"\nretry storm ({route}): {retries} due retries + {new} new messages (submitted in "
          f"{submitted - storm_began:.1f} s); new mail 250 -> arrival {figures(took)}; "
          f"end of data -> 250 {figures(eod)}; {retried_before} retries delivered before the last new "
          f"message, {retried} by {time.monotonic() - storm_began:.1f} s after the start; "
          f"{sum(len(p.attempt_times) for p in peers)} connections")
    assert not [k for k, n in got.items() if n > 1], "a message delivered twice"
    assert arrived, f"only {new_arrived()} of {new} new messages arrived in time"
    assert percentile(took, 0.99) < 3.0
    assert percentile(eod, 0.99) < 0.8


# -- 7. a site that comes back ---------------------------------------------------------------------


def flush_by_command(bed) -> None:
    done = subprocess.run([sys.executable, "-m", "trimail", "queue", "flush", "-d", "flap.bed.test",
                           "-c", str(bed.config_path)], capture_output=True, text=True, timeout=30,
                          check=False)
    assert done.returncode == 0, done.stderr


def flush_by_etrn(bed) -> None:
    client = Client(bed.port)
    try:
        client.command(b"ETRN flap.bed.test\r\n", b"250")
    finally:
        client.close()


def test_when_a_flapping_site_comes_back_flush_d_delivers_its_backlog_at_once(fleet: Fleet, bed_serve):
    flapping_site_comes_back(fleet, bed_serve, flush_by_command)


def test_when_a_flapping_site_comes_back_etrn_delivers_its_backlog_at_once(fleet: Fleet, bed_serve):
    flapping_site_comes_back(fleet, bed_serve, flush_by_etrn)


def flapping_site_comes_back(fleet: Fleet, bed_serve, flush) -> None:
    flapping = fleet.peer("flapping", up=False)  # nothing listening yet
    fleet.zone.domain("flap.bed.test", flapping)
    bed = bed_serve(minimal_backoff_time="300s", maximal_backoff_time="300s",
                    fast_flush_domains="flap.bed.test")
    submit(bed.port, [(f"f{i:02d}", [f"u{i}@flap.bed.test"]) for i in range(20)], sessions=2)
    # the flush makes deferred messages due: all twenty must be in the deferred queue, not
    # only their recipients recorded deferred (the qmgr records the outcome, then moves
    # the message out of active in a transaction of its own: ETRN in between missed it)
    assert wait_for(lambda: len(deferred_recipients(bed.queue_directory, "flap.bed.test")) == 20
                    and message_states(bed.queue_directory).get("deferred") == 20, timeout=10), \
        f"deferred: {len(deferred_recipients(bed.queue_directory, 'flap.bed.test'))} of 20 recipients, " \
        f"messages {message_states(bed.queue_directory)}"
    fleet.up(flapping)
    flush(bed)
    began = time.monotonic()  # once the flush is done: the CLI's own start (up to 3.4 s under load) is not serve's
    delivered = wait_for(lambda: len(flapping.received) >= 20, timeout=10)
    took = time.monotonic() - began
    print(f"\nflapping site: {len(flapping.received)}/20 delivered {took:.2f} s after the flush, "
          f"{flapping.connections} connections")
    assert delivered and took < 5.0
    assert sorted(flapping.tags) == [f"f{i:02d}" for i in range(20)]
