"""trimail: a secure SMTP gateway MTA on trio with its mail queue in SQLite."""

__version__ = "0.1.0"

import logging as _logging

# A library must not print through logging's last-resort handler: an embedding
# program (or trimail.testing) decides where the mail log goes; `trimail serve`
# installs its own handler (trimail.log.setup).
_logging.getLogger("trimail").addHandler(_logging.NullHandler())
