"""What happens to every message on its way into the queue (Postfix's cleanup(8)):
``headers`` (the header section: fields, addresses in header values, completing a
local submission's headers), ``rewrite`` (qualification, virtual aliases,
masquerading, the header rewriting context) and ``submit`` (``trimail sendmail``:
local submission through the maildrop state)."""
