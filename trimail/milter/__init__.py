"""The milter client (Postfix's smtpd_milters and non_smtpd_milters): Sendmail's
mail filter protocol, version 6.

protocol.py (frames and values, sans-IO) | machine.py (one conversation's state and
negotiation, sans-IO) | client.py (one connection on trio) | chain.py (the filters
of a session in order, default action, Postfix's answers) | edit.py (the message as
the filters see it, and their edits)."""
