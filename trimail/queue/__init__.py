"""The mail queue: one SQLite database in ``queue_directory`` (the only code with SQL).

The four Postfix queues are states of rows in the ``message`` table; see
``schema.py`` for the tables, ``database.py`` for opening it, ``store.py`` and
``transitions.py`` for the writes and transitions, ``reads.py`` for the listings.
"""

STATES = ("maildrop", "incoming", "active", "deferred", "hold")
RECIPIENT_STATUSES = ("pending", "deferred", "sent", "bounced")
