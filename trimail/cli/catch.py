"""``trimail catch``: the capturing MTA with Mailpit's HTTP API and a web page
(trimail.catch; docs/catch.md).  Flag names and defaults are Mailpit's
(``--smtp 127.0.0.1:1025``, ``--listen 127.0.0.1:8025``, ``--max 500``,
``--enable-chaos``); ``-o NAME=VALUE`` sets a main.cf parameter of the capturing
listener (``-o message_size_limit=1000000``), and ``-c PATH`` takes the parameters a
main.cf sets explicitly (read only when given: a catcher never picks up
/etc/trimail/main.cf by itself).  The parameters that decide where the catcher
listens, keeps its queue or sends mail are its own (``OWN``).  Runs until SIGTERM
or SIGINT.
"""

from __future__ import annotations

from typing import Annotated

from cyclopts import Parameter

from trimail.cli import ConfigOption, Failure, Overrides, app, load_config

# set by the catcher itself: where it listens and queues, and that nothing leaves it
OWN = frozenset({"queue_directory", "smtpd_listen", "submission_listen", "smtps_listen", "metrics_listen",
                 "reinject_listen", "master_service_disable", "smtpd_workers", "mail_owner", "allow_root",
                 "default_transport", "relay_transport", "local_transport", "virtual_transport", "transport_maps", "relayhost",
                 "content_filter", "always_bcc", "sender_bcc_maps", "recipient_bcc_maps"})


@app.command(name="catch")
def catch_command(*, smtp: Annotated[str, Parameter(name=["--smtp", "-s"], help="SMTP listener HOST:PORT")]
                  = "127.0.0.1:1025",
                  listen: Annotated[str, Parameter(name=["--listen", "--http", "-l"],
                                                   help="HTTP listener (API and web page) HOST:PORT")]
                  = "127.0.0.1:8025",
                  max_messages: Annotated[int, Parameter(name=["--max", "--max-messages", "-m"],
                                                         help="keep at most this many messages, dropping the "
                                                              "oldest (0: no limit)")] = 500,
                  enable_chaos: Annotated[bool, Parameter(name=["--enable-chaos"], negative="",
                                                          help="allow chaos triggers (PUT /api/v1/chaos)")] = False,
                  chaos_seed: Annotated[int | None, Parameter(name=["--chaos-seed"],
                                                              help="seed for the chaos draws (repeatable runs)")]
                  = None,
                  config: ConfigOption = None, o: Overrides = None) -> None:
    """Capture mail for tests: SMTP in, Mailpit's API v1 and a web page out (Mailpit's flags)."""
    import trio

    from trimail.catch import run_until_signal, split_address

    overrides: dict[str, str] = {}
    if config is not None:
        cfg = load_config(config, ())
        overrides = {name: cfg.raw(name) for name in cfg.explicit_names() if name not in OWN}
    for item in o or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise Failure(f"-o {item}: expected NAME=VALUE")
        if "\n" in value or "\r" in value:  # it would add main.cf lines, OWN ones too
            raise Failure(f"-o {name.strip()}: a value is one line")
        if name.strip() in OWN:
            raise Failure(f"-o {name.strip()}: set by trimail catch itself (see --smtp, --listen)")
        overrides[name.strip()] = value.strip()
    try:
        split_address(smtp, "--smtp")
        split_address(listen, "--listen")
    except ValueError as exc:
        raise Failure(str(exc)) from None
    if max_messages < 0:
        raise Failure("--max: must be 0 or more")
    trio.run(lambda: run_until_signal(smtp=smtp, listen=listen, max_messages=max_messages,
                                      enable_chaos=enable_chaos, chaos_seed=chaos_seed, config=overrides))
