"""Admission of SMTP connections: per-client counts and rates, and the stress level.

This is trimail's anvil(8) plus the part of Postfix's master(8) that decides when
the SMTP service is under stress.  It is pure bookkeeping (no I/O, no clock of
its own: callers pass the time), so the accept path cannot fail in here.

* ``admit()`` says whether one more connection from a client address may have a
  session: ``smtpd_process_limit`` sessions in total, at most
  ``smtpd_client_connection_count_limit`` at once and
  ``smtpd_client_connection_rate_limit`` per minute from one address.  A refused
  connection is still counted while it is being told ``421``.
* ``opened()``/``closed()`` keep the counts; every ``opened()`` must be paired
  with one ``closed()`` (the caller does it in ``finally``).
* Stress (Postfix's STRESS_README): when the open sessions reach
  ``smtpd_stress_threshold`` percent of ``smtpd_process_limit``, the service is
  under stress until they drop below half of that number (hysteresis, so the
  mode does not flap with every connection).  ``opened()``/``closed()`` return
  ``True``/``False`` when the mode changes and ``None`` otherwise; what stress
  means for a session (shorter deadlines, one error) is the ``stress``
  parameter's business (``smtpd_timeout = ${stress?{10}:{300}}s``).
* Out of descriptors: a process that cannot accept for want of file descriptors
  (EMFILE, ENFILE: a low ``RLIMIT_NOFILE``, long before ``smtpd_process_limit``)
  is under stress too (``out_of_descriptors``), until its own sessions drop below
  half of what it held then: idle clients holding every descriptor are cut after
  the stress ``smtpd_timeout`` instead of shutting everyone out for 300 s, for as
  long as they care to reconnect.

With smtpd worker processes, the session total (process limit, stress) is
the sum over all workers (``shared``: trimail.processes.board), and so are the
per-client count and rate (``clients``: trimail.processes.clients, whose rate
window is Postfix's anvil's: 60 s from a client's first connection in it).

Security notes: memory is bounded; at most ``MAX_CLIENTS`` rate windows are
kept (the oldest client is forgotten first) and a window holds at most
``limit + 1`` timestamps.

Parameters: smtpd_process_limit, smtpd_client_connection_count_limit,
smtpd_client_connection_rate_limit, smtpd_stress_threshold.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from typing import Protocol

from trimail.config import Config

MAX_CLIENTS = 100_000
RATE_WINDOW = 60.0
AUTH_WINDOW = 600.0  # seconds in which smtpd_auth_failure_limit failures end AUTH for a client

TOO_MANY = "too many connections"
TOO_FAST = "too many connections per minute"


class SharedCount(Protocol):
    """Open sessions counted across processes (trimail.processes.board)."""

    def add(self, change: int) -> None: ...
    def total(self) -> int: ...


class SharedClients(Protocol):
    """Per-client sessions, rates and AUTH failures counted across processes
    (trimail.processes.clients)."""

    def sessions(self, address: str) -> int: ...
    def arrived(self, address: str) -> int: ...
    def add(self, address: str, change: int) -> None: ...
    def auth_failures(self, address: str, window: float) -> int: ...
    def auth_failed(self, address: str, window: float) -> None: ...


class AuthFailures:
    """Failed AUTH attempts per client address within ``AUTH_WINDOW`` (Postfix's
    anvil counts them for ``smtpd_client_auth_rate_limit``-like throttling; here
    they feed ``smtpd_auth_failure_limit``): this process's own, or, given
    *shared*, every smtpd worker's.  Bounded: ``MAX_CLIENTS`` addresses."""

    def __init__(self, shared: SharedClients | None = None) -> None:
        self.shared = shared
        self._recent: dict[str, deque[float]] = {}

    def count(self, address: str, now: float) -> int:
        if self.shared is not None:
            return self.shared.auth_failures(address, AUTH_WINDOW)
        failures = self._recent.get(address)
        while failures and now - failures[0] > AUTH_WINDOW:
            failures.popleft()
        return len(failures) if failures else 0

    def failed(self, address: str, now: float) -> None:
        if self.shared is not None:
            self.shared.auth_failed(address, AUTH_WINDOW)
            return
        self._recent.setdefault(address, deque()).append(now)
        if len(self._recent) > MAX_CLIENTS:  # bounded memory under a distributed attack
            self._recent.pop(next(iter(self._recent)))


class Anvil:
    def __init__(self, config: Config, shared: SharedCount | None = None,
                 clients: SharedClients | None = None) -> None:
        self.per_client: Counter[str] = Counter()
        self.recent: dict[str, deque[float]] = {}
        self._sessions = 0
        self.shared = shared  # smtpd workers: the process limit and stress count every worker's sessions
        self.clients = clients  # smtpd workers: and the per-client limits every worker's clients
        self.stress = False
        self.short_at = 0  # this process's sessions when it last ran out of descriptors (0: it has not)
        self.configure(config)

    @property
    def sessions(self) -> int:
        return self._sessions if self.shared is None else self.shared.total()

    def configure(self, config: Config) -> bool | None:
        """Take the limits of a (re)loaded configuration; counts are kept.  ``False``
        when stress mode ended because the new configuration disables it."""
        self.process_limit: int = config.smtpd_process_limit
        self.count_limit: int = config.smtpd_client_connection_count_limit
        self.rate_limit: int = config.smtpd_client_connection_rate_limit
        percent: int = config.smtpd_stress_threshold
        self.stress_on = math.ceil(self.process_limit * percent / 100) if percent > 0 else 0
        self.stress_off = self.stress_on // 2
        if self.stress and not self.stress_on:
            self.stress = False
            return False
        return None

    def admit(self, address: str, now: float) -> str | None:
        """``None`` when the connection may have a session, else the reason to log
        (``TOO_MANY`` or ``TOO_FAST``).  Counts the connection in the rate window."""
        if self.sessions >= self.process_limit or (self.count_limit and self.client_sessions(address) >= self.count_limit):
            return TOO_MANY
        if self._rate_exceeded(address, now):
            return TOO_FAST
        return None

    def client_sessions(self, address: str) -> int:
        return self.per_client[address] if self.clients is None else self.clients.sessions(address)

    def _rate_exceeded(self, address: str, now: float) -> bool:
        if not self.rate_limit:
            return False
        if self.clients is not None:
            return self.clients.arrived(address) > self.rate_limit
        recent = self.recent.pop(address, None) or deque(maxlen=self.rate_limit + 1)
        self.recent[address] = recent  # most recently seen last: the oldest is forgotten first
        while recent and now - recent[0] > RATE_WINDOW:
            recent.popleft()
        recent.append(now)
        if len(self.recent) > MAX_CLIENTS:
            self.recent.pop(next(iter(self.recent)))
        return len(recent) > self.rate_limit

    def opened(self, address: str) -> bool | None:
        self._count(1)
        self.per_client[address] += 1
        if self.clients is not None:
            self.clients.add(address, 1)
        return self.restate()

    def restate(self) -> bool | None:
        """Stress on or off from the session total (with workers the total moves with
        other processes' sessions too, so either change can show at any open or close),
        and from this process's shortage of descriptors."""
        total = self.sessions
        if self.short_at and self._sessions < self.short_at / 2:
            self.short_at = 0  # half of them are free again
        if not self.stress and self.stress_on and total >= self.stress_on:
            self.stress = True
            return True
        if self.stress and total < max(1, self.stress_off) and not self.short_at:
            self.stress = False
            return False
        return None

    def out_of_descriptors(self) -> bool | None:
        """An accept failed with EMFILE or ENFILE: stress on (``True`` when it just
        turned on), until this process's sessions drop below half of what it holds now.
        Not with no session of its own: stress would free nothing, and it went on and
        off at every retry of the accept."""
        self.short_at = max(self.short_at, self._sessions)
        if self.stress or not self._sessions:  # (no session to cut: stress would free nothing)
            return None
        self.stress = True
        return True

    def _count(self, change: int) -> None:
        self._sessions += change
        if self.shared is not None:
            self.shared.add(change)

    def closed(self, address: str) -> bool | None:
        self._count(-1)
        if self.clients is not None:
            self.clients.add(address, -1)
        self.per_client[address] -= 1
        if self.per_client[address] <= 0:
            del self.per_client[address]
        return self.restate()
