"""``scripts/bench --mode storm``: a retry storm, trimail and Postfix side by side.

One run, for either MTA, in a fresh temporary queue:

1. The MTA starts with ``relayhost`` pointing at a loopback port where nothing
   listens yet.  ``smtp-source`` injects N messages over 20 sessions reusing their
   connections (``-d``), each with a recipient of its own (``-N``); the run waits
   until all N are in the deferred queue (connection refused).
2. The recording sink (``storm_peers.sink_main``) starts on that port.  The whole
   deferred queue is made due at once (``trimail queue flush`` / ``postqueue -f``,
   which also forgets dead destinations and ignores retry times), and as soon as
   that command returns the timed client (``storm_peers.client_main``) sends K new
   messages with marked senders over S sessions, paced at R messages/s.
3. The run ends when the sink has every one of the N + K messages (or at the
   time-out).

Figures per run: new mail's delivery latency, p50 and p99, from its ``250`` at
the client to its arrival at the sink; end-of-data → ``250`` at the client, p50,
p99 and the longest, during the storm (and the whole transaction, MAIL to ``250``); time to
drain everything (flush to the last arrival at the sink); when the last new
message arrived; messages missing or delivered twice.  Runs alternate between
the MTAs; each figure is the median of ``--runs`` runs with min and max.

Both MTAs keep their default concurrency and queue-manager settings (Postfix:
``default_destination_concurrency_limit = 20``, ``default_process_limit = 100``,
``qmgr_message_active_limit = 20000``, ``in_flow_delay = 1s``; trimail: the same
names and defaults).  Only the retry times are set, the same in both
(``minimal_backoff_time = 3600s``, ``maximal_backoff_time = 4000s``,
``queue_run_delay = 3600s``), so that no retry starts before the flush however
long the injection takes.  Addresses: the MTA under test listens on 127.0.100.1
(trimail) or 127.0.100.3 (Postfix), the sink on 127.0.100.2, on ephemeral ports.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import storm_peers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_mtas import free_port, listening, start_postfix

TRIMAIL_ADDRESS = "127.0.100.1"
SINK_ADDRESS = "127.0.100.2"
POSTFIX_ADDRESS = "127.0.100.3"
RETRY_TIMES = {"minimal_backoff_time": "3600s", "maximal_backoff_time": "4000s", "queue_run_delay": "3600s"}
INJECT_SESSIONS = 20
SIZE = 1024


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)  # polling an external process's state, with a deadline


class StormTrimail:
    name = "trimail"

    def __init__(self, workdir: Path, relay: tuple[str, int]) -> None:
        self.dir = workdir / "trimail"
        self.dir.mkdir()
        self.address, self.port = TRIMAIL_ADDRESS, free_port(TRIMAIL_ADDRESS)
        self.config = self.dir / "main.cf"
        self.config.write_text(
            f"smtpd_listen = {self.address}:{self.port}\n"
            f"queue_directory = {self.dir / 'queue'}\n"
            "myhostname = bench.example\n"
            "smtpd_client_connection_count_limit = 0\n"
            "smtpd_process_limit = 20000\n"
            "alias_maps =\nalias_database =\nlocal_recipient_maps =\n"
            "allow_root = yes\n"  # the benchmark runs as root, like the Postfix it is compared with
            f"relayhost = [{relay[0]}]:{relay[1]}\n"
            + "".join(f"{k} = {v}\n" for k, v in RETRY_TIMES.items()))
        self.log_path = self.dir / "serve.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "trimail", "serve", "-c", str(self.config)],
                                         stderr=log, stdout=subprocess.DEVNULL)
        wait_for(lambda: "daemon started" in self.log_path.read_text() or self.proc.poll() is not None,
                 30, "trimail serve to start", 0.05)
        if self.proc.poll() is not None:
            raise SystemExit("bench: trimail serve did not start:\n" + self.log_path.read_text())

    def counts(self) -> dict[str, int]:
        db = sqlite3.connect(f"file:{self.dir / 'queue' / 'queue.db'}?mode=ro", uri=True, timeout=30)
        try:
            return dict(db.execute("SELECT state, count(*) FROM message GROUP BY state").fetchall())
        finally:
            db.close()

    def flush(self) -> None:
        subprocess.run([sys.executable, "-m", "trimail", "queue", "flush", "-c", str(self.config)], check=True,
                       stdout=subprocess.DEVNULL)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class StormPostfix:
    """Debian's Postfix from a configuration directory of its own (as tests/postfix_peer.py,
    on an address of this benchmark's)."""

    name = "postfix"

    def __init__(self, workdir: Path, relay: tuple[str, int]) -> None:
        self.address = POSTFIX_ADDRESS  # 127.0.100.3 is on no interface: master.cf names it
        self.dir, self.conf, self.port = start_postfix(
            workdir, self.address, f"relayhost = [{relay[0]}]:{relay[1]}\n"
            + "".join(f"{k} = {v}\n" for k, v in RETRY_TIMES.items()))

    def counts(self) -> dict[str, int]:
        found = {}
        for sub in ("maildrop", "incoming", "active", "deferred", "hold"):
            found[sub] = sum(len(files) for _, _, files in os.walk(self.dir / "queue" / sub))
        return {k: v for k, v in found.items() if v}

    def flush(self) -> None:
        subprocess.run(["postqueue", "-c", str(self.conf), "-f"], check=True, stdout=subprocess.DEVNULL)

    def stop(self) -> None:
        subprocess.run(["postfix", "-c", str(self.conf), "stop"], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: not listening(self.address, self.port), 30, "postfix to stop", 0.05)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] if ordered else float("nan")


def one_storm(kind: type, storm: int, new: int, sessions: int, rate: float, timeout: float) -> dict:
    """One run: inject *storm* messages towards a dead relay, wait until deferred,
    then revive the relay, flush, and send *new* marked messages (see the module doc)."""
    ctx = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="trimail-storm-") as tmp:
        relay = (SINK_ADDRESS, free_port(SINK_ADDRESS))
        mta = kind(Path(tmp), relay)
        sink = client = None
        try:
            began = time.monotonic()
            subprocess.run(["smtp-source", "-d", "-N", "-s", str(INJECT_SESSIONS), "-m", str(storm), "-l", str(SIZE),
                            "-f", "retry@client.example", "-t", "sink@dest.example", f"{mta.address}:{mta.port}"],
                           check=True, stdout=subprocess.DEVNULL)
            injected = time.monotonic() - began
            wait_for(lambda: mta.counts() == {"deferred": storm}, timeout, f"{storm} deferred messages", 0.5)
            deferred = time.monotonic() - began
            # the client process waits for its go; the sink starts on the dead relay's port
            client_pipe, child = ctx.Pipe()
            client = ctx.Process(target=storm_peers.client_main,
                                 args=(mta.address, mta.port, new, sessions, rate, SIZE, child))
            client.start()
            if not client_pipe.poll(30) or client_pipe.recv() != "ready":
                raise SystemExit("bench: the storm client did not start")
            counter = ctx.Value("q", 0, lock=False)
            sink_pipe, child = ctx.Pipe()
            sink = ctx.Process(target=storm_peers.sink_main, args=(relay[0], relay[1], child, counter))
            sink.start()
            if not sink_pipe.poll(30) or sink_pipe.recv() != "ready":
                raise SystemExit("bench: the storm sink did not start")
            t0 = time.monotonic()
            mta.flush()
            flushed = time.monotonic() - t0
            client_pipe.send("go")
            deadline = time.monotonic() + timeout
            while counter.value < storm + new and time.monotonic() < deadline:
                time.sleep(0.05)  # polling the sink's live count, with a deadline
            timed_out = counter.value < storm + new
            sent = client_pipe.recv() if client_pipe.poll(max(1.0, deadline - time.monotonic())) else \
                {"records": [], "errors": ["client did not finish"], "start": t0, "end": t0}
            sink_pipe.send("stop")
            if not sink_pipe.poll(60):
                raise SystemExit("bench: the storm sink did not report")
            got = sink_pipe.recv()
            left = mta.counts()
        finally:
            for proc in (client, sink):
                if proc is not None:
                    proc.join(10)
                    if proc.is_alive():
                        proc.kill()
            mta.stop()
    arrivals = got["new"]
    latencies, eods, whole = [], [], []
    for number, mail_sent, eod_sent, accepted in sent["records"]:
        eods.append(accepted - eod_sent)
        whole.append(accepted - mail_sent)
        arrived = arrivals.get(f"new-{number:06d}@storm.example")
        latencies.append(arrived - accepted if arrived is not None else math.inf)  # never arrived: infinitely late
    last_new = max(arrivals.values()) - t0 if arrivals else float("nan")
    return {
        "new_p50_s": percentile(latencies, 0.5), "new_p99_s": percentile(latencies, 0.99),
        "eod_p50_ms": percentile(eods, 0.5) * 1000, "eod_p99_ms": percentile(eods, 0.99) * 1000,
        "eod_max_ms": max(eods, default=math.nan) * 1000,
        "txn_p99_ms": percentile(whole, 0.99) * 1000,
        "drain_s": (got["last"] - t0) if got["last"] is not None else float("nan"),
        "last_new_s": last_new, "new_sent_s": sent["end"] - sent["start"],
        "inject_s": injected, "defer_s": deferred, "flush_cmd_s": flushed,
        "delivered": got["distinct"], "duplicates": got["duplicates"],
        "missing": storm + new - got["distinct"], "new_accepted": len(sent["records"]),
        "client_errors": len(sent["errors"]), "first_error": sent["errors"][0] if sent["errors"] else "",
        "left_in_queue": sum(left.values()), "timed_out": timed_out,
    }


FIGURES = {  # key: (label, format); the medians of these go into the table
    "new_p50_s": ("new mail 250 → sink p50 s", "{:.2f}"),
    "new_p99_s": ("new mail 250 → sink p99 s", "{:.2f}"),
    "eod_p50_ms": ("end-of-data → 250 p50 ms", "{:.1f}"),
    "eod_p99_ms": ("end-of-data → 250 p99 ms", "{:.1f}"),
    "eod_max_ms": ("end-of-data → 250 max ms", "{:.0f}"),
    "txn_p99_ms": ("MAIL → 250 p99 ms", "{:.1f}"),
    "drain_s": ("flush → everything delivered s", "{:.1f}"),
    "last_new_s": ("flush → last new mail delivered s", "{:.1f}"),
    "flush_cmd_s": ("flush command s", "{:.2f}"),
    "defer_s": ("inject + all deferred s", "{:.1f}"),
}


def bench_storm(kinds: list[type], storm: int, new: int, sessions: int, rate: float, runs: int) -> dict:
    """*runs* alternating runs per MTA; medians (min–max) and the ratio trimail / Postfix."""
    timeout = max(300.0, (storm + new) / 20)
    print(f"storm: {storm:,} deferred made due at once + {new:,} new over {sessions} sessions at "
          f"{rate:g} msg/s ({'unpaced' if not rate else 'paced'}); {runs} runs, alternating; defaults for "
          f"concurrency and qmgr in both", flush=True)
    results: dict[str, list[dict]] = {k.name: [] for k in kinds}
    for number in range(1, runs + 1):
        for kind in kinds:
            result = one_storm(kind, storm, new, sessions, rate, timeout)
            results[kind.name].append(result)
            print(f"  run {number}, {kind.name}: " + ", ".join(
                f"{label} {fmt.format(result[key])}" for key, (label, fmt) in FIGURES.items())
                + f"; delivered {result['delivered']:,}, missing {result['missing']}, duplicates "
                  f"{result['duplicates']}, client errors {result['client_errors']} {result['first_error']}"
                + (" TIMED OUT" if result["timed_out"] else ""),
                flush=True)
    summary: dict[str, Any] = {"storm": storm, "new": new, "sessions": sessions, "rate": rate, "runs": results}
    for name, found in results.items():
        summary[name] = {key: _stat([r[key] for r in found]) for key in FIGURES}
    if len(kinds) == 2:
        summary["ratio"] = {key: summary["trimail"][key]["median"] / summary["postfix"][key]["median"]
                            for key in FIGURES if summary["postfix"][key]["median"]}
    print()
    print_table(summary, [k.name for k in kinds])
    return summary


def _stat(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def print_table(summary: dict, names: list[str]) -> None:
    header = "| figure | " + " | ".join(f"{n} median (min–max)" for n in names) + " |"
    header += " trimail / postfix |" if len(names) == 2 else ""
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for key, (label, fmt) in FIGURES.items():
        if key not in summary[names[0]]:
            continue  # a figure added after the run that wrote this summary
        row = f"| {label} | " + " | ".join(
            "{} ({}–{})".format(*(fmt.format(summary[n][key][s]) for s in ("median", "min", "max"))) for n in names)
        row += " |"
        if len(names) == 2:
            ratio = summary.get("ratio", {}).get(key)
            row += f" {ratio:.2f} |" if ratio is not None else " |"
        print(row)
