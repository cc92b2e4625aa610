"""The process model (Postfix's master(8) and its children), ``smtpd_workers > 0``.

``trimail serve`` starts a **master** (``supervisor``): it reads the
configuration, takes the queue lock, opens and migrates the queue, binds every
listener, then runs ``smtpd_workers`` **smtpd workers** and one **qmgr worker**
(``worker``), each a fresh interpreter with its own trio event loop, and keeps
them running.  The workers inherit the listening sockets, the queue lock's
descriptor and the qmgr trigger (``trimail.scheduler.trigger``); each talks
to the master over its own ``channel`` (one JSON line per request and answer).
``smtpd_workers = 0`` is the single-process ``trimail.master.serve``.
"""
