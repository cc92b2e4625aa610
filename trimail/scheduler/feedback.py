"""A destination's concurrency window (Postfix's qmgr_queue.c throttle/unthrottle
and qmgr_feedback.c), as plain arithmetic: no clock, no I/O.

The window is how many connections (worker tasks) the queue manager lets a
destination have.  It starts at ``<transport>_initial_destination_concurrency``
(at most the transport's ``_destination_concurrency_limit``) and moves by feedback:

- **success** (a connection that got its greeting and EHLO reply, and a delivery
  over one when no attempt has failed for ``QUIET`` seconds): the positive
  feedback (``..._positive_feedback``: ``1``, ``1/N`` or ``1/concurrency`` of the
  window) accumulates; each time it adds up to 1 the window grows by 1, up to the
  limit, and only while the window is below the workers it has plus the initial
  concurrency (so it stays near real use).
- **failure** (a connection attempt that failed: connect, greeting, EHLO): the
  negative feedback is applied at once (the window drops by 1 at the start of
  each 1/feedback sequence of failures), never below 1.
- **cohort**: each failure adds 1/window to the failed pseudo-cohort count; a
  delivery that went through resets it.  When it reaches
  ``..._failed_cohort_limit`` (0: never) ``failed()`` says so, and the caller
  declares the destination dead if no connection to it is up.

Feedback 0 means no adjustment.  A destination back from the dead starts at a
window of 1 (``probing``): one connection attempt tells whether it is back.
"""

from __future__ import annotations

import dataclasses

from trimail.config import Config
from trimail.config.values import Feedback

HYSTERESIS = 1  # Postfix's fb->hysteresis (fixed at 1 since 2.5)
QUIET = 10.0  # seconds without a failed attempt after which deliveries count as positive feedback


@dataclasses.dataclass(frozen=True, slots=True)
class WindowSettings:
    limit: int  # <transport>_destination_concurrency_limit (at least 1)
    initial: int  # <transport>_initial_destination_concurrency
    positive: Feedback
    negative: Feedback
    cohort_limit: int  # 0: a destination is never declared dead

    @classmethod
    def from_config(cls, config: Config, transport: str, limit: int) -> WindowSettings:
        """The settings of *transport*: ``smtp_`` and ``relay_`` have overrides of their own."""
        own = transport in ("smtp", "relay")

        def get(name: str, default: str) -> object:
            return config.get(f"{transport}_{name}" if own else default)

        return cls(max(1, limit), max(1, int(get("initial_destination_concurrency", "initial_destination_concurrency"))),
                   get("destination_concurrency_positive_feedback",
                       "default_destination_concurrency_positive_feedback"),  # type: ignore[arg-type]
                   get("destination_concurrency_negative_feedback",
                       "default_destination_concurrency_negative_feedback"),  # type: ignore[arg-type]
                   int(get("destination_concurrency_failed_cohort_limit",  # type: ignore[call-overload]
                           "default_destination_concurrency_failed_cohort_limit")))


class Window:
    """One destination's window; ``size`` is the number of workers it may have."""

    def __init__(self, settings: WindowSettings, *, probing: bool = False) -> None:
        self.settings = settings
        self.size = 1 if probing else min(settings.initial, settings.limit)
        self.success = 0.0  # positive feedback accumulated towards the next increase
        self.failure = 0.0  # negative feedback left before the next decrease
        self.fail_cohorts = 0.0
        self.last_failure = -QUIET  # (trio time) of the last failed connection attempt

    def succeeded(self, workers: int) -> None:
        """A connection got its greeting and EHLO reply (qmgr_queue_unthrottle)."""
        s = self.settings
        self.fail_cohorts = 0.0
        if self.size < s.limit and self.size < workers + s.initial:
            feedback = s.positive.at(self.size)
            self.success += feedback
            # prepare for overshoot (feedback > hysteresis, rounding error)
            while self.success + feedback / 2 >= HYSTERESIS and feedback > 0:
                self.size += HYSTERESIS
                self.success -= HYSTERESIS
                self.failure = 0.0
            self.size = min(self.size, s.limit)

    def delivered(self, workers: int, now: float) -> None:
        """A delivery over an established connection went through: the failed
        cohorts count starts again, and, when no connection attempt has failed
        for ``QUIET`` seconds, it is positive feedback as a new connection's is
        (Postfix gives it per delivery: a window shrunk by a site's 421s grows
        again while its connections are reused, once the site stops refusing)."""
        self.fail_cohorts = 0.0
        if now - self.last_failure >= QUIET:
            self.succeeded(workers)

    def failed(self, now: float = 0.0) -> bool:
        """A connection attempt failed (qmgr_queue_throttle).  True when the failed
        pseudo-cohorts reached the limit: the destination is dead unless a
        connection to it is still up."""
        s = self.settings
        self.last_failure = now
        self.fail_cohorts += 1.0 / self.size
        dead = s.cohort_limit > 0 and self.fail_cohorts >= s.cohort_limit - 1e-9  # (float sums of 1/N)
        feedback = s.negative.at(self.size)
        self.failure -= feedback
        while self.failure - feedback / 2 < 0:  # the decrease comes first in a sequence
            self.size -= HYSTERESIS
            self.success = 0.0
            self.failure += HYSTERESIS
        self.size = max(1, self.size)
        return dead
