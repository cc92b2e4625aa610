"""Fairness of the queue manager against a real serve and a real sink: new mail
is interleaved with a retry storm to the same destination (Postfix alternates
its incoming and deferred queues), not delivered after it."""

from __future__ import annotations

import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.faults.conftest import daemon, wait_until  # noqa: F401  (the fixture)
from tests.scheduler.fleet import Fleet, message_states
from tests.scheduler.storm import Sessions, TimedSink, percentile, queue_due_retries, queue_messages
from trimail.delivery.route import Route
from trimail.queue.transitions import ClaimedMessage
from trimail.scheduler.destination import Job
from trimail.scheduler.jobqueue import JobQueue

SINK_HOST = "127.0.80.2"


def test_new_mail_is_not_delivered_after_a_retry_storm_to_the_same_destination(daemon, tmp_path):  # noqa: F811
    storm, new = 3000, 40
    queue_due_retries(tmp_path / "queue", storm)
    with TimedSink(SINK_HOST) as sink:
        d = daemon(relayhost=f"[{SINK_HOST}]:{sink.port}")
        wait_until(lambda: len(sink.arrivals()) >= 100, timeout=30)  # the storm is being delivered
        sessions = Sessions(d.port, sessions=2, per_session=new // 2).start()
        sessions.join()
        wait_until(lambda: sum(s.startswith("new") for _, s in sink.arrivals()) == new, timeout=60)
        arrivals = sink.arrivals()
        retries_before = sum(s.startswith("retry") for _, s in arrivals)
        latencies = [at - sessions.sent_at[subject] for at, subject in arrivals if subject.startswith("new")]
        print(f"\n{new} new messages delivered {statistics.median(latencies):.2f} s (p50), "
              f"{percentile(latencies, 99):.2f} s (p99) after their 250, while {retries_before} of {storm} "
              "retries were delivered")
        assert retries_before < storm * 0.6, "new mail waited for the retry storm"
        assert percentile(latencies, 99) < 3.0


def job(name: str, retry: bool) -> Job:
    message = ClaimedMessage(name, "", 0.0, 0.0, 0, {}, [], retry=retry)
    return Job(message, [], Route("smtp", "example.com"))


def test_a_destination_takes_new_mail_and_retries_in_turn():
    jobs = JobQueue()
    for n in range(5):
        jobs.append(job(f"r{n}", True))
    jobs.append(job("n0", False))
    jobs.append(job("n1", False))
    assert len(jobs) == 7 and jobs
    taken = [jobs.popleft().message.id for _ in range(7)]
    assert taken == ["n0", "r0", "n1", "r1", "r2", "r3", "r4"]
    assert not jobs and len(jobs) == 0
    with pytest.raises(IndexError):
        jobs.popleft()


@given(st.lists(st.booleans(), max_size=40), st.integers(0, 40))
def test_job_queue_iterates_in_the_order_it_is_taken(kinds, taken_first):
    jobs = JobQueue(job(f"j{n}", retry) for n, retry in enumerate(kinds))
    for _ in range(min(taken_first, len(kinds))):
        jobs.popleft()
    listed = [j.message.id for j in jobs]
    assert len(listed) == len(jobs)
    assert listed == [jobs.popleft().message.id for _ in range(len(listed))]
    for n, retry in enumerate(kinds):
        jobs.append(job(f"k{n}", retry))
    jobs.clear()
    assert not jobs and list(jobs) == []


def test_a_tarpit_with_a_backlog_larger_than_the_active_queue_does_not_starve_other_mail(
        fleet: Fleet, daemon, tmp_path):  # noqa: F811
    """300 messages for a tarpit (connections that never get a greeting), the
    active queue limited to 100: the tarpit keeps its share (25%), the rest of its
    backlog waits in the deferred queue, and mail for a healthy site is delivered
    at once (without the share, the tarpit fills the active queue and the healthy
    mail waits for the tarpit's timeouts)."""
    backlog, new, active_limit = 300, 20, 100
    queue_messages(tmp_path / "queue", [f"t{i}@tarpit.example" for i in range(backlog)], prefix="T")
    tarpit, healthy = fleet.peer("tarpit", greet=False), fleet.peer("healthy")  # never greets / accepts all
    fleet.zone.update({"tarpit.example": {"A": [tarpit.host]}, "healthy.example": {"A": [healthy.host]}})
    d = daemon(dns_nameservers=fleet.nameserver, qmgr_message_active_limit=active_limit,
               smtp_destination_concurrency_limit=10, initial_destination_concurrency=10)
    wait_until(lambda: tarpit.connections_now >= 10, timeout=20)  # the tarpit holds its connections
    sessions = Sessions(d.port, sessions=2, per_session=new // 2, domain="healthy.example").start()
    sessions.join()
    wait_until(lambda: len(healthy.received) >= new, timeout=30)
    latencies = [r.at - sessions.sent_at["new " + address.split("@")[0][1:]]
                 for r in list(healthy.received) for address in r.recipients]
    # the healthy mail is received at the peer a moment before serve records it and
    # removes it from the active queue: the tarpit's share is what stays active
    share = active_limit * 25 // 100
    wait_until(lambda: message_states(d.queue_directory).get("active", 0) <= share, timeout=10)
    states = message_states(d.queue_directory)
    print(f"\n{new} messages to a healthy site delivered {statistics.median(latencies):.2f} s (p50), "
          f"{percentile(latencies, 99):.2f} s (p99) after their 250 while the tarpit holds "
          f"{tarpit.connections_now} connections; queue: {states}")
    assert percentile(latencies, 99) < 3.0
    assert states.get("active", 0) <= share
    assert states.get("deferred", 0) + states.get("incoming", 0) >= backlog - share

