"""Dead destinations (Postfix's throttled queues), remembered past their last worker.

A destination is declared dead by its last worker when a whole failed cohort of
connection attempts went by with no connection to it up (``feedback.Window``).
Then its queued jobs are deferred with the failure, and until ``now +
minimal_backoff_time`` (Postfix unthrottles a dead queue after
``minimal_backoff_time``) every new job for it — new mail and retries alike — is
deferred at once without a connection, with Postfix's text ``delivery temporarily
suspended: <reason>``.  So a dead site costs one cohort of connection attempts,
then one attempt (a window of 1, ``probing``) per backoff period, never one per
message.

A flush (``trimail queue flush``, ETRN) forgets the dead destinations: it commits
the mail it makes due, then tells the queue manager (``flush``: the trigger ``F``
or the control command).  A round can claim that mail in between (each deferral
starts one), and a flushed message would be deferred at once again, a whole
backoff out, against the site the flush was meant to revive.  So the flush also
marks each message it makes due with its time (``message.flushed``, in the same
transaction), and a job of such a message finds a destination declared dead
before that time alive (``refusal``): Postfix's flush(8) marks each queue file
it flushes (``MAIL_QUEUE_STAT_UNTHROTTLE``) and qmgr unthrottles the queues of
such a file as it reads it (``QMGR_FLUSH_EACH``).  A site declared dead again
after the flush (the flushed mail's own attempt failed) stays dead for the rest
of that mail, so a flush costs a site still down one more cohort, not one per
message.  The times are wall-clock times of this host (the flush may run in
another process): a clock stepped back between the two may still leave flushed
mail to the ``F`` alone, as before.

A destination that goes idle (no job, no worker) while its failures are not yet
forgiven (a failed cohort under way) leaves its window here too (``keep``), for
``minimal_backoff_time``: the next job for it continues the count, so messages
that come one at a time to a site that refuses connections make it dead after
one cohort as a burst does (Postfix forgets an idle queue's window; then every
such message would pay an attempt).

Memory is bounded: a dead entry is dropped when it is looked up after its time,
and a sweep drops the stale ones whenever the registry has doubled since the last
sweep; at most ``WINDOWS_KEPT`` windows are kept (the oldest go first).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

from trimail.delivery.outcome import Outcome, deferred
from trimail.scheduler.feedback import Window

SUSPENDED = "delivery temporarily suspended: "
WINDOWS_KEPT = 10_000


@dataclasses.dataclass(frozen=True, slots=True)
class DeadSite:
    destination: str  # as logged: transport:nexthop
    since: float  # wall-clock time it was declared dead
    until: float  # wall-clock time new jobs are tried again
    reason: str  # the failure that killed it (dsn and text)


def suspended(outcome: Outcome) -> Outcome:
    """The outcome of a job deferred because its destination is dead."""
    text = outcome.text if outcome.text.startswith(SUSPENDED) else SUSPENDED + outcome.text
    return deferred(outcome.dsn if outcome.dsn.startswith("4") else "4.4.1", text)


class DeadSites:
    """Destinations declared dead, remembered after their last worker is gone, so
    new jobs for them are deferred at once without a connection each."""

    def __init__(self) -> None:
        self._dead: dict[tuple, tuple[DeadSite, Outcome]] = {}
        self._swept_at = 16  # sweep when the registry is twice as big as after the last sweep
        self._windows: OrderedDict[tuple, tuple[Window, float]] = OrderedDict()

    def mark(self, key: tuple, destination: str, outcome: Outcome, now: float, duration: float) -> DeadSite:
        """Declare *key* dead for *duration* seconds from *now* because of *outcome*."""
        site = DeadSite(destination, now, now + duration, f"{outcome.dsn} {outcome.text}")
        self._dead[key] = (site, suspended(outcome))
        self._windows.pop(key, None)
        if len(self._dead) >= 2 * self._swept_at:
            self._sweep(now)
        return site

    def refusal(self, key: tuple, now: float, flushed: float | None = None) -> Outcome | None:
        """The outcome for a new job to *key* while it is dead, else None.  After
        its time the entry stays (as ``revived``) until its destination is made again.
        A job of mail that a flush made due at *flushed*, after *key* was declared
        dead, finds it alive: the flush forgets it (as ``flush`` would), whether or
        not the queue manager has heard of the flush yet."""
        entry = self._dead.get(key)
        if entry is None or now >= entry[0].until:
            return None
        if flushed is not None and flushed >= entry[0].since:
            del self._dead[key]  # (it has no kept window: mark dropped it, keep is not called while dead)
            return None
        return entry[1]

    def revived(self, key: tuple, now: float) -> bool:
        """Was *key* dead until a moment ago?  (A new destination for it then starts
        with a window of 1.)  Forgets the entry once its time is over."""
        entry = self._dead.get(key)
        if entry is None or now < entry[0].until:
            return False
        del self._dead[key]
        return True

    def keep(self, key: tuple, window: Window, until: float) -> None:
        """Remember the window of an idle destination with failures not yet forgiven."""
        self._windows[key] = (window, until)
        self._windows.move_to_end(key)
        while len(self._windows) > WINDOWS_KEPT:
            self._windows.popitem(last=False)

    def window(self, key: tuple, now: float) -> Window | None:
        """The window kept for *key* (and forget it), if its time is not over."""
        entry = self._windows.pop(key, None)
        return entry[0] if entry is not None and now < entry[1] else None

    def flush(self) -> None:
        """Forget every dead site and kept window: an operator's flush or a client's
        ETRN tries them all again now (Postfix's QMGR_REQ_FLUSH_DEAD: the trigger ``F``,
        or the control socket's ``flush``; the mail it made due is marked too, see
        ``refusal``)."""
        self._dead.clear()
        self._windows.clear()

    def snapshot(self, now: float) -> list[DeadSite]:
        """The destinations dead at *now* (for `trimail queue summary` and /metrics)."""
        return [site for site, _ in self._dead.values() if now < site.until]

    def _sweep(self, now: float) -> None:
        """Forget entries whose dead time ended a whole dead period ago."""
        for key, (site, _) in list(self._dead.items()):
            if now >= site.until + (site.until - site.since):
                del self._dead[key]
        self._swept_at = max(16, len(self._dead))

    def __len__(self) -> int:
        return len(self._dead)
