"""Parameters of the queue and the queue manager (qmgr(8)): where the queue lives,
who runs it, retry timing, lifetimes and the concurrency of deliveries.

One entry per parameter (``trimail.config.param``): name, default as main.cf text,
parser, one line of documentation; ``T(...)`` marks a trimail-only parameter.
``trimail.config.registry`` puts the tables together, in this order.

Parameters: none read (this is a part of the registry).
"""

from __future__ import annotations

from trimail.config.param import P, Param, T
from trimail.config.values import (
    parse_bool,
    parse_count,
    parse_feedback,
    parse_int,
    parse_size,
    parse_text,
    parse_user_list,
    time_parser,
)

TITLE = "The queue and the queue manager (qmgr(8))"

PARAMS: list[Param] = [
    # queue
    P("queue_directory", "/var/spool/trimail", parse_text, "directory of the queue database"),
    T("queue_busy_timeout", "30s", time_parser(), "how long a queue write waits while another process (an "
       "operator's tool) holds the database's write lock; past it the write fails temporarily (451, deferral)"),
    P("queue_minfree", "0", parse_size,
       "free bytes the queue file system needs for smtpd to accept MAIL FROM; it also needs "
       "more than 1.5 * message_size_limit"),
    P("mail_owner", "trimail", parse_text, "unprivileged account serve runs as"),
    P("authorized_mailq_users", "static:anyone", parse_user_list,
      "users who may list the queue through serve (mailq, sendmail -bp, trimail queue list): names, "
      "uid:N, !name, type:table; root and mail_owner always may"),
    P("authorized_flush_users", "static:anyone", parse_user_list,
      "users who may flush the queue through serve (sendmail -q, trimail flush); root and mail_owner "
      "always may"),
    P("authorized_submit_users", "static:anyone", parse_user_list,
      "users who may submit mail with sendmail (exit 77 for the others, as Postfix's sendmail and "
      "postdrop); no one is exempt, root included"),
    T("allow_root", "no", parse_bool,
       "stay root instead of becoming mail_owner: development and test suites only"),
    T("chroot", "no", parse_bool, "confine serve to queue_directory after start (see docs/security.md)"),
    P("minimal_backoff_time", "300s", time_parser(), "shortest retry interval for deferred mail"),
    P("maximal_backoff_time", "4000s", time_parser(), "longest retry interval for deferred mail"),
    P("maximal_queue_lifetime", "5d", time_parser("d"), "how long deferred mail is retried"),
    P("bounce_queue_lifetime", "5d", time_parser("d"), "how long deferred bounces are retried"),
    P("bounce_size_limit", "50000", parse_size,
       "largest original message a non-delivery notification returns whole; a larger one is "
       "returned as its headers only (0: no limit)"),
    P("queue_run_delay", "300s", time_parser(), "how often the deferred queue is scanned"),
    P("qmgr_message_active_limit", "20000", parse_int, "most messages in the active queue"),
    P("qmgr_message_recipient_limit", "20000", parse_int,
       "most recipients of active messages held in memory by the queue manager; claims stop there"),
    T("qmgr_destination_active_share", "25", parse_int,
       "percent of qmgr_message_active_limit one destination's jobs of new mail (waiting and in "
       "delivery) may hold, and its retries as much again (never less than its concurrency limit); a "
       "message whose jobs all go to destinations at their share waits in the deferred queue without a "
       "delivery attempt, paced back at the destination's delivery rate (at most queue_run_delay)"),
    P("default_destination_recipient_limit", "50", parse_int,
       "most recipients per message delivery"),
    P("smtp_destination_recipient_limit", "$default_destination_recipient_limit", parse_int,
       "most recipients per message delivery with the smtp transport"),
    P("relay_destination_recipient_limit", "$default_destination_recipient_limit", parse_int,
       "most recipients per message delivery with the relay transport"),
    P("default_process_limit", "100", parse_int,
       "most delivery agents at once (trimail: delivery worker tasks holding a slot)"),
    P("default_destination_concurrency_limit", "20", parse_int,
       "most parallel deliveries to one destination"),
    P("smtp_destination_concurrency_limit", "$default_destination_concurrency_limit", parse_int,
       "most parallel deliveries to one destination with the smtp transport"),
    P("relay_destination_concurrency_limit", "$default_destination_concurrency_limit", parse_int,
       "most parallel deliveries to one destination with the relay transport"),
    P("initial_destination_concurrency", "5", parse_int,
       "initial number of parallel deliveries to a new destination (its concurrency window starts "
       "there and moves with feedback between 1 and <transport>_destination_concurrency_limit)"),
    P("default_destination_concurrency_positive_feedback", "1", parse_feedback,
       "window increase per connection that gets its greeting and EHLO reply: a number, "
       "number/number or number/concurrency in 0..1 (0: none); the window grows by 1 each time "
       "this adds up to 1"),
    P("default_destination_concurrency_negative_feedback", "1", parse_feedback,
       "window decrease per failed connection attempt (connect, greeting or EHLO failure), in "
       "the same forms; never below 1"),
    P("default_destination_concurrency_failed_cohort_limit", "1", parse_count,
       "failed pseudo-cohorts (a window's worth of failed connection attempts, no success in "
       "between) after which a destination with no connection up is dead: its queued mail is "
       "deferred and new mail for it is deferred at once for minimal_backoff_time (0: never)"),
    *(P(f"{transport}_{name}", f"${default}", parser,
         f"{default} for the {transport} transport")
      for transport in ("smtp", "relay")
      for name, default, parser in (
          ("initial_destination_concurrency", "initial_destination_concurrency", parse_int),
          ("destination_concurrency_positive_feedback",
           "default_destination_concurrency_positive_feedback", parse_feedback),
          ("destination_concurrency_negative_feedback",
           "default_destination_concurrency_negative_feedback", parse_feedback),
          ("destination_concurrency_failed_cohort_limit",
           "default_destination_concurrency_failed_cohort_limit", parse_count))),
    P("delay_warning_time", "0h", time_parser("h"), "when to tell the sender mail is delayed (0: never)"),
    P("hopcount_limit", "50", parse_int, "most Received: headers before a mail loop bounce"),
    P("duplicate_filter_limit", "1000", parse_count,
      "addresses cleanup's duplicate filter remembers per message: a recipient given twice "
      "is queued once (0: no limit; a user's submission through serve: always every address)"),
]
