"""Dead destinations (Postfix's throttled queues): declared when a whole cohort of
connection attempts fails with no connection up, remembered for
minimal_backoff_time, new jobs deferred at once without connecting."""

from __future__ import annotations

import time

import trio

from tests.conftest import trimail, wait_for
from tests.delivery.test_delivery import queue, send
from tests.scheduler.fleet import Fleet

SUSPENDED = "delivery temporarily suspended: "


def replies(srv, domain: str) -> dict[str, tuple[int, str]]:
    """Each queued recipient of *domain*: (attempts, last reply)."""
    return {r.address: (r.attempts, r.last_reply or "") for m in queue(srv) for r in m.recipients
            if r.address.endswith("@" + domain)}


async def test_a_dead_site_costs_one_cohort_then_one_attempt_per_backoff_period(start_mta,
                                                                                 ephemeral_fleet: Fleet):
    dead = ephemeral_fleet.peer("dead", greet=False)
    live = ephemeral_fleet.peer("live")
    srv = await start_mta(smtp_helo_timeout="0.5s", minimal_backoff_time="3s", maximal_backoff_time="6s",
                          transport_maps=f"inline:{{ dead.example=smtp:[{dead.host}]:{dead.port}, "
                                         f"live.example=smtp:[{live.host}]:{live.port} }}")
    # many messages in a row: one cohort of attempts (at most the initial window, 5)
    for i in range(20):
        await send(srv, "a@client.example", [f"d{i}@dead.example"])
    await wait_for(lambda: len(replies(srv, "dead.example")) == 20
                   and all(n == 1 for n, _ in replies(srv, "dead.example").values()), timeout=10)
    first = dead.connections
    suspended = sum(text.split(" ", 1)[1].startswith(SUSPENDED) for _, text in replies(srv, "dead.example").values())
    assert 1 <= first <= 5
    assert suspended >= 20 - first

    # while it is dead, new mail for it is deferred at once, without a connection;
    # a healthy destination is not affected
    t0 = trio.current_time()
    for i in range(20, 30):
        await send(srv, "a@client.example", [f"d{i}@dead.example"])
    for i in range(5):
        await send(srv, "a@client.example", [f"l{i}@live.example"])
    await wait_for(lambda: len(live.recipients) == 5, timeout=5)
    await wait_for(lambda: len(replies(srv, "dead.example")) == 30
                   and all(n >= 1 for n, _ in replies(srv, "dead.example").values()), timeout=5)
    news = {a: v for a, v in replies(srv, "dead.example").items() if int(a[1:].split("@")[0]) >= 20}
    assert all(text.split(" ", 1)[1].startswith(SUSPENDED) for _, text in news.values()), news
    assert dead.connections == first
    assert trio.current_time() - t0 < 3  # all of this happened within the dead period

    # the retries after the backoff period: one probe (a window of 1), not one per message
    await wait_for(lambda: all(n >= 2 for n, _ in replies(srv, "dead.example").values()), timeout=20)
    probes = dead.connections - first
    print(f"\ndead site: {first} connection attempts for the first 20 messages, 0 for the next 10, "
          f"{probes} for the 30 retries")
    assert 1 <= probes <= 2


async def test_an_attempt_on_a_silent_site_costs_smtp_helo_timeout_and_no_quit(start_mta,
                                                                               ephemeral_fleet: Fleet):
    """A peer that never greets: the attempt ends when smtp_helo_timeout is up, and
    the client hangs up without sending QUIT into a conversation that never began
    (it used to wait up to 5 s more for a reply to its QUIT)."""
    dead = ephemeral_fleet.peer("dead", greet=False)
    srv = await start_mta(smtp_helo_timeout="0.5s", relayhost=f"[{dead.host}]:{dead.port}")
    queue_id = await send(srv, "a@client.example", ["r@far.example"])
    await wait_for(lambda: any(m.id == queue_id and m.state == "deferred" for m in queue(srv)), timeout=10)
    await wait_for(lambda: len(dead.durations) == dead.connections, timeout=10)
    held = list(dead.durations)
    print(f"\nsilent site: {dead.connections} attempts, held {', '.join(f'{h:.2f}' for h in held)} s")
    assert bytes(dead.unanswered) == b""
    assert all(0.4 < h < 2 for h in held)


async def test_a_site_refusing_every_connection_dies_after_one_cohort_even_one_message_at_a_time(
        start_mta, ephemeral_fleet: Fleet):
    """Each attempt on a site that answers every connection with 421 is over before
    the next message comes, so the destination goes idle in between: its failure
    count must survive that, or every message would pay an attempt."""
    peer = ephemeral_fleet.peer("refusing", refusing=True)
    srv = await start_mta(relayhost=f"[{peer.host}]:{peer.port}")
    for i in range(20):
        await send(srv, "a@client.example", [f"r{i}@far.example"])
        await wait_for(lambda n=i + 1: len(replies(srv, "far.example")) == n
                       and all(a == 1 for a, _ in replies(srv, "far.example").values()), timeout=10)
    print(f"\n20 messages one at a time to a site refusing every connection: {peer.connections} attempts")
    assert peer.connections == 3  # windows 5, 3, 2: 1/5 + 1/3 + 1/2 >= one cohort
    texts = [text.split(" ", 1)[1] for _, text in replies(srv, "far.example").values()]
    assert sum(t.startswith(SUSPENDED) for t in texts) == 17


async def test_a_flush_forgets_dead_sites_so_a_site_that_came_back_gets_its_mail_at_once(
        start_mta, ephemeral_fleet: Fleet):
    """Postfix's flush (postqueue -f / -s, ETRN) purges the dead-site information
    (QMGR_REQ_FLUSH_DEAD): when a site is back, `trimail queue flush` delivers its
    backlog now, not after the rest of the dead time."""
    peer = ephemeral_fleet.peer("refusing", refusing=True)  # down: 421 to everyone
    srv = await start_mta(relayhost=f"[{peer.host}]:{peer.port}")  # minimal_backoff_time 300s
    for i in range(10):
        await send(srv, "a@client.example", [f"r{i}@far.example"])
    await wait_for(lambda: len(replies(srv, "far.example")) == 10
                   and all(n == 1 for n, _ in replies(srv, "far.example").values()), timeout=10)
    assert srv.scheduler.dead.snapshot(time.time())
    ephemeral_fleet.set(peer, refusing=False, session_limit=10)  # back
    await trio.to_thread.run_sync(lambda: trimail("queue", "flush", "-c", srv.config.source))
    await wait_for(lambda: len(peer.recipients) == 10, timeout=10)
    await wait_for(lambda: not queue(srv), timeout=10)
    assert not srv.scheduler.dead.snapshot(time.time())
