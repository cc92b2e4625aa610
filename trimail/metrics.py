"""Prometheus metrics (prometheus_client): what serve counts and measures.

Each serve has its own registry (several embedded servers in one process never
mix their numbers).  Counters move where the events happen (smtpd, scheduler,
queue writer); queue sizes and the oldest message's age are read from the
database when the endpoint is scraped, on one of the writer's reading
connections (a worker thread, never the event loop nor the group commit), from
rows the queue keeps for it (``queue_count``, the ``message_arrival`` index): a
few rows whatever the queue's length.  ``trimail_dead_destinations`` is read from
the queue manager's memory of dead destinations (serve sets its function).  The
``metrics_listen`` endpoint that answers with them is trimail.net.http.  With worker
processes the master answers with the sum of every process's registry
(trimail.processes.aggregate).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from trimail import log as maillog


class _LogDrops(Collector):
    """trimail_log_lines_dropped_total: mail log lines dropped because the log
    destination did not keep up (trimail.log bounds its queue)."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily("trimail_log_lines_dropped",
                                  "Mail log lines dropped because the log destination did not keep up",
                                  value=maillog.dropped_lines())


class _Made:
    """A metric of ``Metrics``, made and registered on first use: a test MTA starts in
    milliseconds and most of these (delivery, bounces, failures) it never uses.  The
    exposition makes every one first, so the endpoint shows them all from the start.
    A gauge read from a function (``Metrics.measure``) gets it when it is made."""

    def __init__(self, make: Callable[[CollectorRegistry], Any]) -> None:
        self.make = make
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, metrics: Metrics | None, owner: type | None = None) -> Any:
        if metrics is None:
            return self
        with metrics._making:  # the writer thread may be first (commit) while the loop is too
            made = metrics.__dict__.get(self.name)
            if made is None:
                made = metrics.__dict__[self.name] = self.make(metrics.registry)
                function = metrics._functions.get(self.name)
                if function is not None:
                    made.set_function(function)
            return made


class Metrics:
    received = _Made(lambda r: Counter("trimail_messages_received", "Messages accepted into the queue",
                                       registry=r))
    delivered = _Made(lambda r: Counter("trimail_recipients_delivered", "Recipients delivered", ["transport"],
                                        registry=r))
    deferred = _Made(lambda r: Counter("trimail_recipients_deferred", "Delivery attempts deferred",
                                       ["dsn_class"], registry=r))
    bounced = _Made(lambda r: Counter("trimail_recipients_bounced", "Recipients bounced", ["dsn_class"],
                                      registry=r))
    rejected = _Made(lambda r: Counter("trimail_smtpd_rejects", "SMTP commands refused by policy",
                                       ["command", "code"], registry=r))
    sessions = _Made(lambda r: Gauge("trimail_smtpd_sessions", "Open SMTP sessions", registry=r))
    queue = _Made(lambda r: Gauge("trimail_queue_messages", "Messages in the queue", ["state"], registry=r))
    oldest = _Made(lambda r: Gauge("trimail_queue_oldest_message_age_seconds", "Age of the oldest queued message",
                                   registry=r))
    dead = _Made(lambda r: Gauge("trimail_dead_destinations", "Destinations held dead: new mail for them is "
                                 "deferred without a connection until their retry time", registry=r))
    stress = _Made(lambda r: Gauge("trimail_smtpd_stress", "1 while the SMTP service is under stress (STRESS_README)",
                                   registry=r))
    destinations = _Made(lambda r: Gauge("trimail_destination_connections", "Delivery connections in use",
                                         ["destination"], registry=r))
    delivery_seconds = _Made(lambda r: Histogram(
        "trimail_delivery_duration_seconds", "Time from arrival to delivery",
        buckets=(0.05, 0.1, 0.5, 1, 5, 30, 60, 300, 3600, 86400), registry=r))
    commit_seconds = _Made(lambda r: Histogram(
        "trimail_queue_commit_seconds", "Duration of one group commit",
        buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5), registry=r))
    commit_batch = _Made(lambda r: Histogram(
        "trimail_queue_commit_batch_size", "Requests per group commit",
        buckets=(1, 2, 5, 10, 20, 50, 100, 200, 512), registry=r))
    failures = _Made(lambda r: Counter("trimail_task_failures", "Failures contained by an error boundary",
                                       ["task"], registry=r))

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._making = threading.Lock()
        self._functions: dict[str, Callable[[], float]] = {}  # gauge name -> what it reads (measure)
        self._delivery_workers: dict[str, int] = {}  # destination -> its delivery workers (delivery_worker)
        self.registry.register(_LogDrops())

    def measure(self, name: str, function: Callable[[], float]) -> None:
        """The gauge *name* (``sessions``, ``dead``) reads *function* when scraped.  It
        is made only then (prometheus_client's ``set_function`` ties the gauge to
        itself in a reference cycle, which only the garbage collector undoes: a test
        MTA that is never scraped leaves none behind)."""
        with self._making:
            self._functions[name] = function
            made = self.__dict__.get(name)
        if made is not None:
            made.set_function(function)

    def delivery_worker(self, destination: str, change: int) -> None:
        """A delivery worker of *destination* started (+1) or ended (-1).  The
        destination's label goes when its last worker ends: kept, a label for every
        destination ever seen grows without bound on an outbound gateway (at
        100,000 of them, a 9.6 MB exposition taking a second of the qmgr's event loop
        per scrape).  The queue manager's event loop is the only caller."""
        count = self._delivery_workers.get(destination, 0) + change
        if count > 0:
            self._delivery_workers[destination] = count
            self.destinations.labels(destination).set(count)
        else:
            self._delivery_workers.pop(destination, None)
            with contextlib.suppress(KeyError):
                self.destinations.remove(destination)

    def set_queue(self, counts: dict[str, int], oldest: float | None) -> None:
        """The queue gauges from what ``Store.gauges`` read: messages per state, and the
        oldest message's age."""
        for state in ("maildrop", "incoming", "active", "deferred", "hold"):
            self.queue.labels(state).set(counts.get(state, 0))
        self.oldest.set(0 if oldest is None else max(0.0, time.time() - oldest))

    def task_failed(self, task: str) -> None:
        self.failures.labels(task).inc()

    def outcome(self, status: str, dsn: str, transport: str, arrival_time: float) -> None:
        if status == "sent":
            self.delivered.labels(transport).inc()
            self.delivery_seconds.observe(max(0.0, time.time() - arrival_time))
        elif status == "deferred":
            self.deferred.labels(dsn[:1] + ".x.x").inc()
        else:
            self.bounced.labels(dsn[:1] + ".x.x").inc()

    def commit(self, batch: int, seconds: float) -> None:
        self.commit_batch.observe(batch)
        self.commit_seconds.observe(seconds)

    def exposition(self) -> bytes:
        for name, attribute in vars(Metrics).items():
            if isinstance(attribute, _Made):
                getattr(self, name)
        return generate_latest(self.registry)
