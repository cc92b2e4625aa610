"""Queue database schema, versioned with ``PRAGMA user_version``.

``MIGRATIONS[i]`` takes the schema from version *i* to *i + 1*; a new version is a
new entry at the end, never an edit of an old one.

Tables (all STRICT):

- ``message``: one row per queued message.  ``state`` is the Postfix queue it is
  in (maildrop, incoming, active, deferred, hold, or corrupt for rows that failed
  to load); ``next_attempt`` is when a deferred message is due, ``flushed`` when a
  flush last made it due (the queue manager's dead-site check reads it with the
  claim).  The compound index on (state, next_attempt) serves both "what is due in
  the deferred queue" and "how many rows per state" without a table scan.
- ``recipient``: one row per envelope recipient, with its own delivery status
  (pending, deferred, sent, bounced), attempt count, next attempt and last reply.
  ``notified`` is set (1) once a bounced recipient is in a delivery status notification;
  a sent one owed a success notice (NOTIFY=SUCCESS) holds a code above 1 until the
  notice of its message's round is queued (``transitions.owed_notices``).
- ``body``: the message content in wire format (CRLF line ends), one blob per
  message, written with incremental blob I/O so a large message is never held in
  memory whole.
- ``queue_count``: messages per state, kept by triggers on ``message``, so the
  metrics and ``trimail status`` read five rows instead of counting the queue.

Operator reads have indexes of their own: ``message_arrival`` (the oldest
message, for metrics) and ``recipient_site`` on the deferred recipients' site, the
text after the last ``@``, lower case (ASCII, as DNS compares names) and without
trailing dots: ``trimail queue flush -d`` and ``ETRN`` find a site's deferred mail
through it, and ``trimail queue summary`` groups by the same expression
(``queue.admin.SITE``, which must stay the same text as the index's).  The index
is partial: a recipient enters it when it is deferred, so receiving mail (all
recipients ``pending``) does not pay for it.
"""

from __future__ import annotations

MIGRATIONS: list[str] = [
    # 0 -> 1
    """
    CREATE TABLE message (
        id             TEXT PRIMARY KEY,
        state          TEXT NOT NULL CHECK (state IN
                         ('maildrop', 'incoming', 'active', 'deferred', 'hold', 'corrupt')),
        sender         TEXT NOT NULL,
        arrival_time   REAL NOT NULL,
        next_attempt   REAL,
        size           INTEGER NOT NULL,
        client_address TEXT NOT NULL DEFAULT '',
        client_name    TEXT NOT NULL DEFAULT '',
        helo_name      TEXT NOT NULL DEFAULT '',
        protocol       TEXT NOT NULL DEFAULT '',
        params         TEXT NOT NULL DEFAULT '{}'
    ) STRICT;
    CREATE INDEX message_state_next_attempt ON message (state, next_attempt);

    CREATE TABLE recipient (
        message_id   TEXT NOT NULL REFERENCES message (id) ON DELETE CASCADE,
        seq          INTEGER NOT NULL,
        address      TEXT NOT NULL,
        status       TEXT NOT NULL DEFAULT 'pending' CHECK (status IN
                         ('pending', 'deferred', 'sent', 'bounced')),
        attempts     INTEGER NOT NULL DEFAULT 0,
        next_attempt REAL,
        last_reply   TEXT,
        PRIMARY KEY (message_id, seq)
    ) STRICT, WITHOUT ROWID;

    CREATE TABLE body (
        message_id TEXT NOT NULL UNIQUE REFERENCES message (id) ON DELETE CASCADE,
        content    BLOB NOT NULL
    ) STRICT;
    """,
    # 1 -> 2: remember which bounced recipients the sender has been told about
    """
    ALTER TABLE recipient ADD COLUMN notified INTEGER NOT NULL DEFAULT 0;
    """,
    # 2 -> 3: a delay warning (delay_warning_time) is sent once per message
    """
    ALTER TABLE message ADD COLUMN delay_warned INTEGER NOT NULL DEFAULT 0;
    """,
    # 3 -> 4: cheap operator reads: counts kept per state, the oldest message and a
    # site's recipients found through indexes
    """
    CREATE TABLE queue_count (
        state    TEXT PRIMARY KEY,
        messages INTEGER NOT NULL
    ) STRICT, WITHOUT ROWID;
    INSERT INTO queue_count (state, messages) SELECT state, count(*) FROM message GROUP BY state;
    CREATE TRIGGER queue_count_insert AFTER INSERT ON message BEGIN
        INSERT INTO queue_count (state, messages) VALUES (NEW.state, 1)
            ON CONFLICT (state) DO UPDATE SET messages = messages + 1;
    END;
    CREATE TRIGGER queue_count_delete AFTER DELETE ON message BEGIN
        UPDATE queue_count SET messages = messages - 1 WHERE state = OLD.state;
    END;
    CREATE TRIGGER queue_count_state AFTER UPDATE OF state ON message WHEN OLD.state IS NOT NEW.state BEGIN
        UPDATE queue_count SET messages = messages - 1 WHERE state = OLD.state;
        INSERT INTO queue_count (state, messages) VALUES (NEW.state, 1)
            ON CONFLICT (state) DO UPDATE SET messages = messages + 1;
    END;
    CREATE INDEX message_arrival ON message (arrival_time);
    CREATE INDEX recipient_site ON recipient (lower(rtrim(CASE WHEN instr(substr(address, instr(address, '@') + 1), '@') = 0
        THEN substr(address, instr(address, '@') + 1)
        ELSE substr(address, length(rtrim(address, replace(address, '@', ''))) + 1) END, '.')))
        WHERE status = 'deferred';
    """,
    # 4 -> 5: the queue manager claims new mail oldest first through an index, never
    # by sorting every incoming row (qmgr's incoming scan; 268 ms at 10^6 rows without it)
    """
    CREATE INDEX message_state_id ON message (state, id);
    """,
    # 5 -> 6: the next-attempt index holds the deferred messages only (all its queries
    # are about them): a new message, its claim and its removal each write one page less
    """
    DROP INDEX message_state_next_attempt;
    CREATE INDEX message_deferred ON message (state, next_attempt) WHERE state = 'deferred';
    """,
    # 6 -> 7: when a flush (ETRN, queue flush) last made the message due: its claim then
    # finds its destinations alive if they were declared dead before that (flush(8)'s
    # mark on a queue file it flushes, which qmgr reads with the file)
    """
    ALTER TABLE message ADD COLUMN flushed REAL;
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)
