"""smtpd(8)'s decisions, split by job: ``context`` (what every session of one listener
shares), ``session`` (each protocol event -> policy -> reply), ``auth`` (SASL AUTH
against the password table), ``commit`` (Received:, hop count, the shielded group
commit before ``250``, the hand-over to the queue manager) and ``hooks`` (the
extension point trimail.testing uses).  The sans-IO protocol machine is
``trimail.smtp.server``; the I/O loop around both is ``trimail.net.session``."""
