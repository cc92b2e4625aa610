"""``scripts/bench``'s command line: the parser, and the defaults that depend on the mode."""

from __future__ import annotations

import argparse
from pathlib import Path

MODES = ["report", "accept", "e2e", "latency", "scaling", "testmta", "filtering", "queuelist", "scale", "idle", "storm"]
LOAD_MODES = {"report": ["accept", "e2e", "latency"], "accept": ["accept"], "e2e": ["e2e"],
              "latency": ["latency"], "scaling": ["accept"]}
# messages per run for each size, so that a run lasts seconds, not minutes
MESSAGES_FOR_SIZE = {1024: 3000, 10240: 2000, 102400: 1000}
QUICK_MESSAGES_FOR_SIZE = {1024: 1000, 10240: 600, 102400: 300}
# scaling compares worker counts whose rates differ by 1.5-2x: 3,000 messages were
# under a second for two workers, whose median then read 3,311 msg/s against 3,607
# with 10,000 (20 sessions, reuse, 5 runs each), while one worker's read the same
# (2,381 and 2,394): each run starts a fresh MTA, and its first moments weigh more
# on a short run.  So a scaling run lasts seconds for every worker count.
SCALING_MESSAGES_FOR_SIZE = {1024: 10000, 10240: 6000, 102400: 2000}


def workers_list(text: str) -> list[str]:
    """``--workers 0,1,2``: the ``smtpd_workers`` values trimail runs with, in order,
    each once; ``auto`` or a count (0: the single process)."""
    values = []
    for item in text.split(","):
        item = item.strip().lower()
        if item != "auto" and not (item.isdigit() and int(item) < 1000):
            raise argparse.ArgumentTypeError(f"bad worker count {item!r}: auto or 0, 1, 2, ... (comma-separated)")
        value = item if item == "auto" else str(int(item))
        if value not in values:
            values.append(value)
    return values


def reuse_modes(text: str) -> list[str]:
    """``--reuse yes|no|both``: the connection modes, as bench_load's names."""
    choices = {"yes": ["yes"], "no": ["no"], "both": ["yes", "no"]}
    if text.lower() not in choices:
        raise argparse.ArgumentTypeError(f"bad --reuse {text!r}: yes, no or both")
    return choices[text.lower()]


def build_parser(description: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="report", choices=MODES,
                        help="report (the default): accept, e2e and latency over every size, session count and "
                             "connection mode; accept: into the queue; e2e: injection start to empty queue, relaying "
                             "to smtp-sink; latency: one message at a time on an idle MTA; scaling: accept by trimail "
                             "worker count; the others: see above")
    parser.add_argument("--reuse", type=reuse_modes, default=reuse_modes("both"), metavar="{yes,no,both}",
                        help="connections: yes = each session reuses one (smtp-source -d), no = one message per "
                             "connection (smtp-source without -d, what a gateway sees from the Internet), "
                             "both (the default)")
    parser.add_argument("--workers", type=workers_list, metavar="LIST",
                        help="trimail's smtpd_workers, one trimail per value, e.g. 0,1,2 (default: auto; "
                             "scaling: 0,1,2); Postfix runs once per round")
    parser.add_argument("--quick", action="store_true",
                        help="fewer messages per run (1,000 / 600 / 300 for 1 / 10 / 100 KiB)")
    parser.add_argument("-l", "--size", type=int, nargs="+", dest="sizes",
                        help="message sizes in bytes (report: 1024 10240 102400; else 1024)")
    parser.add_argument("-s", "--sessions", type=int, nargs="+",
                        help="concurrent sessions (report: 1 20 100; else 20; idle: 10000)")
    parser.add_argument("-m", "--messages", type=int,
                        help="messages per run (default by size: 3000 / 2000 / 1000 for 1 / 10 / 100 KiB; "
                             "scaling: 10000 / 6000 / 2000)")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure, alternating between the MTAs")
    parser.add_argument("--mta", choices=["trimail", "postfix", "both"],
                        help="default: both; scaling: trimail")
    parser.add_argument("--autogroup", choices=["keep", "off"], default="keep",
                        help="the kernel's grouping of processes by session (kernel.sched_autogroup_enabled) "
                             "during the load modes: keep it as it is (the default), or off for the runs, "
                             "restored after (root); with it on the load generator weighs as much as the whole "
                             "MTA on these shared cores (docs/benchmarks.md)")
    parser.add_argument("--generator", choices=["auto", "smtp-source", "builtin"], default="auto")
    parser.add_argument("-k", "--new", type=int, default=2000,
                        help="storm: new messages sent during the storm (default 2000)")
    parser.add_argument("--rate", type=float, default=100.0,
                        help="storm: new messages per second, all sessions together; 0: as fast as accepted")
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000],
                        help="scale: deferred messages not due (default 10000 100000 1000000)")
    parser.add_argument("--incoming", type=int, nargs="+", default=[100_000],
                        help="scale: new messages in incoming beside them (default 100000)")
    parser.add_argument("--due", type=int, default=1000, help="scale: deferred messages that are due (default 1000)")
    parser.add_argument("--batch", type=int, default=100, help="scale: messages in one claim (default 100)")
    parser.add_argument("--repeat", type=int, default=7, help="scale: timings per figure (default 7)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser


def parse(argv: list[str] | None = None, description: str = "") -> argparse.Namespace:
    """The arguments, with the defaults of the chosen mode filled in: ``modes`` (the
    load modes to run), ``sizes``, ``sessions``, ``workers``, ``mta`` and
    ``messages_for(size)``."""
    parser = build_parser(description)
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    args.mta = args.mta or ("trimail" if args.mode == "scaling" else "both")
    args.workers = args.workers or (["0", "1", "2"] if args.mode == "scaling" else ["auto"])
    args.modes = LOAD_MODES.get(args.mode, [])
    if args.modes:
        report = args.mode == "report"
        args.sizes = args.sizes or ([1024, 10240, 102400] if report else [1024])
        args.sessions = args.sessions or ([1, 20, 100] if report else [20])
    table = QUICK_MESSAGES_FOR_SIZE if args.quick else (
        SCALING_MESSAGES_FOR_SIZE if args.mode == "scaling" else MESSAGES_FOR_SIZE)
    fixed = args.messages
    args.messages_for = lambda size: fixed or table.get(size, table[102400])
    return args
