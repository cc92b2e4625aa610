"""``SharedTestMTA``: one test MTA for a whole test session (the
``trimail_mta_session`` fixture), cleared before each test that uses it.

Mail that one test's application sends late (from a background thread, after the
test ended) must not show up in the next test.  So ``clear()`` also starts a new
epoch: a message whose transaction (its ``MAIL FROM``) began before the last
``clear()`` is still accepted by the MTA (the sender sees ``250``) but is not
captured.  A transaction is stamped with the epoch at ``MAIL``, its queue ID
with the transaction's epoch at the end of DATA, and the capture compares that
with the epoch in force when the message is committed.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from trimail.testing.hooks import _Hooks
from trimail.testing.sync import TestMTA

if TYPE_CHECKING:
    from trimail.receive.hooks import AcceptedMessage
    from trimail.receive.session import SmtpdSession
    from trimail.smtp.replies import Reply


class _EpochHooks(_Hooks):
    """The test MTA's session hooks, plus the epoch of each transaction."""

    async def before(self, stage: str, session: SmtpdSession, address: str | None) -> Reply | None:
        if session.txn is not None:
            if stage == "mail":
                self.owner._began(session.txn)
            elif stage == "end":
                self.owner._ending(session.txn)
        return await super().before(stage, session, address)

    def accepted(self, message: AcceptedMessage) -> None:
        if not self.owner._late(message.queue_id):
            super().accepted(message)


class SharedTestMTA(TestMTA):
    """A ``TestMTA`` shared by many tests: ``clear()`` forgets the captured mail and
    the faults, and drops mail from transactions that began before it."""

    __test__ = False
    hooks_class = _EpochHooks

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._epoch = 0
        self._transactions: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self._queue_ids: dict[str, int] = {}  # queue ID -> epoch of its transaction, until captured

    def clear(self) -> None:
        with self._lock:
            self._epoch += 1
        super().clear()

    def _began(self, transaction: Any) -> None:
        with self._lock:
            self._transactions[transaction] = self._epoch

    def _ending(self, transaction: Any) -> None:
        with self._lock:
            self._queue_ids[transaction.queue_id] = self._transactions.get(transaction, self._epoch)

    def _late(self, queue_id: str) -> bool:
        """Whether the message's transaction began before the last ``clear()``."""
        with self._lock:
            epoch = self._queue_ids.pop(queue_id, self._epoch)
            return epoch != self._epoch
