"""trimail: a secure SMTP gateway MTA on trio with its mail queue in SQLite."""

__version__ = "0.1.0"
