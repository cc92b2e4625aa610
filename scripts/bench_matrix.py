"""The load modes of ``scripts/bench`` (report, accept, e2e, latency, scaling):
runs, cells, and their tables.

A *contestant* is one MTA set-up: Postfix, or trimail with one ``smtpd_workers``
value.  A *cell* is one load (mode, message size, sessions, messages, connection
mode); each cell is run ``--runs`` times, the contestants taking turns within
each round, and every figure is the median of its runs with min and max.  The
ratio is each trimail's median over Postfix's, in the same cell; beside it, the
least and the greatest ratio of one round (trimail's run over the Postfix run
next to it).  A host whose speed drifts between rounds moves both runs of a round
together, so the round ratios show how far the verdict holds, where the medians
of two spreads alone may hide it.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_load import REUSE_LABELS, STEPS, measure_latency, run_load
from bench_mtas import SINK_ADDRESS, free_port
from bench_procs import autogroup_off, interpreter, tree_usage, wait_until_idle

METRICS = {"rate": ("msg/s", "{:,.0f}"), "cpu_per_1000": ("CPU s / 1,000 msgs", "{:.2f}"),
           "peak_rss_mib": ("peak RSS MiB, sum", "{:,.0f}"), "largest_rss_mib": ("largest process MiB", "{:,.0f}"),
           "latency_p50_ms": ("latency p50 ms", "{:.1f}"), "latency_p99_ms": ("latency p99 ms", "{:.1f}"),
           **{f"step_{name}_ms": (f"p50 ms, {name}", "{:.3f}") for name in STEPS}}
LOAD_METRICS = ("rate", "cpu_per_1000", "peak_rss_mib", "largest_rss_mib")
TABLE_METRICS = ("rate", "cpu_per_1000", "peak_rss_mib")
LATENCY_METRICS = ("latency_p50_ms", "latency_p99_ms", *(f"step_{name}_ms" for name in STEPS))


def latency_metrics(reuse: str) -> tuple[str, ...]:
    """With reuse, only the steps of every message (the connection's are made once)."""
    once = ("step_connect_ms", "step_ehlo_ms", "step_quit_ms")
    return tuple(m for m in LATENCY_METRICS if reuse != "yes" or m not in once)


@dataclass(frozen=True)
class Contestant:
    """An MTA class of bench_mtas and, for trimail, its ``smtpd_workers``."""

    kind: type
    workers: str | None = None

    @property
    def label(self) -> str:
        return self.kind.name if self.workers is None else f"{self.kind.name}, workers {self.workers}"

    def start(self, workdir: Path, relay: tuple[str, int] | None) -> Any:
        return self.kind(workdir, relay, self.workers)


def stat(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def one_run(contestant: Contestant, key: dict, generator: str, relay: tuple[str, int] | None) -> dict:
    """One fresh MTA and one load (see the module docstring of scripts/bench)."""
    mode = key["mode"]
    with tempfile.TemporaryDirectory(prefix="trimail-bench-") as tmp:
        mta = contestant.start(Path(tmp), relay if mode == "e2e" else None)
        try:
            if mode == "latency":
                figures = measure_latency(mta.address, mta.port, key["reuse"], key["messages"])
                return {"latency_p50_ms": figures.pop("p50") * 1000, "latency_p99_ms": figures.pop("p99") * 1000,
                        **{f"step_{name}_ms": seconds * 1000 for name, seconds in figures.items()}}
            settled = wait_until_idle(mta.root_pid())
            before = tree_usage(mta.root_pid())
            started = time.perf_counter()
            complaints = run_load(generator, mta.address, mta.port, key["messages"], key["sessions"], key["size"],
                                  key["reuse"])
            left = mta.queue_size()
            if mode == "e2e":
                deadline = time.monotonic() + 600
                while left and time.monotonic() < deadline:
                    time.sleep(0.01)  # polling the queue of another process, with a deadline
                    left = mta.queue_size()
            elapsed = time.perf_counter() - started
            after = tree_usage(mta.root_pid())
        finally:
            mta.stop()
    result = {"seconds": elapsed, "rate": key["messages"] / elapsed,
              "cpu_per_1000": (after.cpu_seconds - before.cpu_seconds) * 1000 / key["messages"],
              "peak_rss_mib": after.peak_rss_sum_kib / 1024, "largest_rss_mib": after.peak_rss_max_kib / 1024,
              "processes": after.processes}
    if not settled:
        result["warnings"] = ["the MTA was still busy 15 s after it started; its CPU includes some of that"]
    expected = key["messages"] if mode == "accept" else 0
    if left != expected:  # accept: every message queued; e2e: the queue drained
        result.setdefault("warnings", []).append(f"{left} messages in the queue at the end, expected {expected}")
    if complaints:
        result.setdefault("warnings", []).append(
            f"the load generator complained {len(complaints)} times, first: {complaints[0]}")
        result["generator_complaints"] = complaints
    return result


def run_cell(contestants: list[Contestant], key: dict, generator: str, relay: tuple[str, int] | None,
             runs: int) -> dict:
    metrics = latency_metrics(key["reuse"]) if key["mode"] == "latency" else LOAD_METRICS
    results: dict[str, list[dict]] = {c.label: [] for c in contestants}
    for number in range(1, runs + 1):
        for contestant in contestants:
            result = one_run(contestant, key, generator, relay)
            results[contestant.label].append(result)
            print(f"  {cell_label(key)}, {REUSE_LABELS[key['reuse']]}, run {number}, {contestant.label}: "
                  + ", ".join(f"{METRICS[m][1].format(result[m])} {METRICS[m][0]}" for m in metrics), flush=True)
            for warning in result.get("warnings", []):
                print(f"    warning: {warning}", flush=True)
    return summarise(key, results, metrics)


def summarise(key: dict, results: dict[str, list[dict]], metrics: tuple[str, ...]) -> dict:
    """A cell: its key, every run, each figure's median (min–max) per contestant,
    and each trimail contestant's ratio of medians to Postfix's, with the ratios of
    its rounds (``round_ratio``: median, min, max of trimail's run over Postfix's run
    of the same round)."""
    cell = dict(key)
    cell["runs"] = results
    cell["figures"] = {label: {m: stat([r[m] for r in found]) for m in metrics} for label, found in results.items()}
    postfix = cell["figures"].get("postfix")
    if postfix:
        cell["ratio"] = {label: {m: figures[m]["median"] / postfix[m]["median"]
                                 for m in metrics if postfix[m]["median"]}
                         for label, figures in cell["figures"].items() if label != "postfix"}
        cell["round_ratio"] = {label: {m: stat([run[m] / other[m] for run, other in zip(found, results["postfix"])])
                                       for m in metrics if all(other[m] for other in results["postfix"])}
                               for label, found in results.items() if label != "postfix"}
    return cell


def size_label(size: int) -> str:
    return f"{size // 1024} KiB" if size % 1024 == 0 else f"{size} B"


def cell_label(cell: dict) -> str:
    if cell["mode"] == "latency":
        return f"latency: {size_label(cell['size'])}, one message at a time, idle MTA"
    return f"{cell['mode']}: {size_label(cell['size'])}, {cell['sessions']} sessions"


def workers_of(label: str) -> str:
    return label.split("workers ", 1)[1] if "workers " in label else "default"


def _figure(stats: dict, fmt: str) -> str:
    return f"{fmt.format(stats['median'])} ({fmt.format(stats['min'])}–{fmt.format(stats['max'])})"


def matrix_table(cells: list[dict]) -> list[str]:
    """One Markdown table: a row per cell, connection mode, trimail worker count and
    figure, with trimail's and Postfix's median (min–max) and the ratio trimail / Postfix
    of the medians (the least–greatest ratio of one round)."""
    labels = list(dict.fromkeys(label for cell in cells for label in cell["figures"]))
    trimails = [label for label in labels if label != "postfix"] or [None]
    postfix = "postfix" in labels
    header = "| test | connections | trimail workers | figure |"
    header += " trimail median (min–max) |" if trimails != [None] else ""
    header += " postfix median (min–max) |" if postfix else ""
    header += " trimail / postfix (rounds) |" if postfix and trimails != [None] else ""
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for cell in cells:
        metrics = latency_metrics(cell["reuse"]) if cell["mode"] == "latency" else TABLE_METRICS
        for label in trimails:
            for metric in metrics:
                unit, fmt = METRICS[metric]
                row = (f"| {cell_label(cell)} | {REUSE_LABELS[cell['reuse']]} | "
                       f"{workers_of(label) if label else '—'} | {unit} |")
                if label:
                    row += f" {_figure(cell['figures'][label][metric], fmt)} |"
                if postfix:
                    row += f" {_figure(cell['figures']['postfix'][metric], fmt)} |"
                if postfix and label:
                    ratio = cell.get("ratio", {}).get(label, {}).get(metric)
                    rounds = cell.get("round_ratio", {}).get(label, {}).get(metric)
                    row += f" {ratio:.2f}" if ratio is not None else ""
                    row += f" ({rounds['min']:.2f}–{rounds['max']:.2f}) |" if rounds is not None else " |"
                lines.append(row)
    return lines


def scaling_table(cells: list[dict]) -> list[str]:
    """trimail's accept cells by worker count: rate and its ratio to 1 worker, CPU
    per 1,000 messages and its ratio to 0 workers (the single process), memory; then
    one line per load saying what 2 workers give over 1 (issue 16's goal: 1.5x,
    CPU not above the single process's)."""
    header = ("| load | connections | trimail workers | msg/s median (min–max) | × workers 1 "
              "| CPU s / 1,000 msgs | CPU × workers 0 | peak RSS MiB, sum | largest process MiB |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    verdicts = []
    for cell in cells:
        if cell["mode"] != "accept":
            continue
        trimail = {workers_of(label): figures for label, figures in cell["figures"].items() if label != "postfix"}
        one, zero = trimail.get("1"), trimail.get("0")
        for workers, figures in trimail.items():
            rate, cpu = figures["rate"], figures["cpu_per_1000"]
            speedup = f"{rate['median'] / one['rate']['median']:.2f}" if one else "—"
            cpu_ratio = f"{cpu['median'] / zero['cpu_per_1000']['median']:.2f}" if zero else "—"
            lines.append(f"| {cell_label(cell)} | {REUSE_LABELS[cell['reuse']]} | {workers} | "
                         f"{_figure(rate, '{:,.0f}')} | {speedup} | {_figure(cpu, '{:.2f}')} | {cpu_ratio} | "
                         f"{_figure(figures['peak_rss_mib'], '{:,.0f}')} | "
                         f"{_figure(figures['largest_rss_mib'], '{:,.0f}')} |")
        two = trimail.get("2")
        if one and two:
            verdict = (f"{cell_label(cell)}, {REUSE_LABELS[cell['reuse']]}: 2 workers / 1 = "
                       f"{two['rate']['median'] / one['rate']['median']:.2f}× msg/s (goal ≥ 1.5)")
            if two["rate"]["min"] <= one["rate"]["max"] and one["rate"]["min"] <= two["rate"]["max"]:
                verdict += " [the min–max ranges overlap: within this machine's noise]"
            if zero:
                verdict += (f"; CPU per 1,000 at 2 workers / at 0 = "
                            f"{two['cpu_per_1000']['median'] / zero['cpu_per_1000']['median']:.2f} (goal ≤ 1.0)")
            verdicts.append(verdict)
    return lines + ([""] + verdicts if verdicts else [])


def bench_load_modes(args: Any, contestants: list[Contestant], generator: str) -> dict:
    """Every cell of *args* (modes × sizes × sessions × connection modes), with the
    table at the end, and the scaling table when trimail ran with several worker counts."""
    sink = None
    relay = (SINK_ADDRESS, free_port(SINK_ADDRESS))
    if "e2e" in args.modes:
        if not shutil.which("smtp-sink"):
            raise SystemExit("bench: e2e mode needs smtp-sink (Debian package postfix)")
        sink = subprocess.Popen(["smtp-sink", "-u", "nobody", f"{relay[0]}:{relay[1]}", "1000"])
    cells: list[dict] = []
    python = interpreter()
    print(f"trimail runs on Python {python['version']} ({python['executable']}"
          f"{', shared libpython' if python['shared_libpython'] else ''})", flush=True)
    try:
        with autogroup_off(args.autogroup == "off") as autogroup:
            print(f"{', '.join(c.label for c in contestants)}; {args.runs} runs per figure, alternating; "
                  f"connections: {', '.join(REUSE_LABELS[r] for r in args.reuse)}; load from {generator}; "
                  f"{os.cpu_count()} CPUs; autogroup {autogroup}", flush=True)
            if args.runs < 3:
                print("  (fewer than 3 runs per figure: a check, not figures to quote)", flush=True)
            run_cells(args, contestants, generator, relay, cells)
    finally:
        if sink is not None:
            sink.terminate()
            sink.wait(10)
    print()
    print("\n".join(matrix_table(cells)))
    if len([c for c in contestants if c.kind.name == "trimail"]) > 1 and "accept" in args.modes:
        print()
        print("\n".join(scaling_table(cells)))
    return {"generator": generator, "runs": args.runs, "cpus": os.cpu_count(), "autogroup": autogroup, "python": python,
            "contestants": [c.label for c in contestants], "reuse": args.reuse, "cells": cells}


def run_cells(args: Any, contestants: list[Contestant], generator: str, relay: tuple[str, int],
              cells: list[dict]) -> None:
    """Every cell of *args*, each appended to *cells* as it is done."""
    for mode in args.modes:
        if mode == "latency":
            for reuse in args.reuse:
                key = {"mode": mode, "size": 1024, "sessions": 1, "messages": 200, "reuse": reuse}
                cells.append(run_cell(contestants, key, generator, relay, args.runs))
            continue
        for size in args.sizes:
            for sessions in args.sessions:
                for reuse in args.reuse:
                    key = {"mode": mode, "size": size, "sessions": sessions,
                           "messages": args.messages_for(size), "reuse": reuse}
                    cells.append(run_cell(contestants, key, generator, relay, args.runs))
