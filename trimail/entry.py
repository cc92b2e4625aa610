"""The ``trimail`` binary's entry point: ``sendmail`` without the command line.

``trimail sendmail ARGS``, and the binary invoked through a link named
``sendmail``, run trimail.cleanup.submit at once; everything else goes to the
command line (trimail.cli.main, which knows the other personalities).  Local
submission is what cron, scripts and every ``mail`` command run, once per message:
importing the whole command line first (cyclopts, rich, every command module) cost
it about 100 ms of its 0.37 s.

Parameters: none.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main() -> None:
    linked = Path(sys.argv[0]).name == "sendmail"
    if linked or sys.argv[1:2] == ["sendmail"]:
        from trimail.cleanup.submit import main as sendmail

        sendmail(sys.argv[1:] if linked else sys.argv[2:])
    from trimail.cli import main as command_line

    command_line()
