"""CPU time and memory of a whole MTA, every process of it, for ``scripts/bench``;
and the kernel setting that decides how the MTA shares the CPUs with the load
generator (``autogroup_off``, at the end).

An MTA here is a tree of processes: Postfix's master(8) and the daemons it runs,
or trimail's master and its smtpd and qmgr workers (``smtpd_workers``; one
process when 0).  Its processes are found from the root's pid: every process in
the root's session (Postfix's master calls setsid(); the bench starts trimail with
a session of its own) and every descendant by parent pid.

CPU: the sum over the live processes of user + system time (``/proc/PID/stat``
fields 14 and 15) and of their waited-for children's (``cutime`` and ``cstime``,
fields 16 and 17).  A child that exited during a run is no longer in the tree,
but its parent reaped it, so its time is in the parent's ``cutime``: the sum
misses nothing and counts nothing twice (Postfix's cleanup and smtpd processes
exit after ``max_use`` uses, trimail's master restarts a worker that died).  Only
a process that is orphaned (re-parented to init) and then dies is lost.  Take the
figure before and after the load; the difference is the load's CPU.

Memory: ``VmHWM`` (peak resident set) of each live process, both summed and the
largest.  The sum over-counts pages shared between processes (forked workers
share the master's pages until written; Postfix's daemons share libraries), so it
is an upper bound; the largest process is a lower bound.  A process that exited
before the end of the run is not in either.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class Usage:
    """CPU seconds (user + system, live processes and their reaped children) and
    peak RSS in KiB (summed over the live processes, and the largest one)."""

    cpu_seconds: float
    peak_rss_sum_kib: int
    peak_rss_max_kib: int
    processes: int


def stat_fields(text: str) -> list[str]:
    """The fields of a ``/proc/PID/stat`` line after the command name, which may
    itself hold spaces and parentheses: ``fields[0]`` is the state (field 3 of
    proc(5)), so proc(5)'s field N is ``fields[N - 3]``."""
    return text.rsplit(")", 1)[1].split()


def cpu_ticks(fields: list[str]) -> int:
    """utime + stime + cutime + cstime (proc(5) fields 14 to 17), in clock ticks."""
    return sum(int(value) for value in fields[11:15])


def tree_pids(root: int) -> list[int]:
    """*root* and every process in its session or descended from it (parent pids)."""
    parents: dict[int, int] = {}
    session: set[int] = set()
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = stat_fields((entry / "stat").read_text())
        except OSError:
            continue  # exited while we looked
        pid = int(entry.name)
        parents[pid] = int(fields[1])  # proc(5) field 4: ppid
        if int(fields[3]) == root:  # field 6: session id
            session.add(pid)
    found = {root} if root in parents else set()
    found |= session
    grew = True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in found} - found
        found |= children
        grew = bool(children)
    return sorted(found)


def usage(pids: list[int]) -> Usage:
    """The CPU and peak memory of *pids* now (see the module's docstring)."""
    ticks_per_second = os.sysconf("SC_CLK_TCK")
    ticks = rss_sum = rss_max = counted = 0
    for pid in pids:
        try:
            fields = stat_fields((PROC / str(pid) / "stat").read_text())
            status = (PROC / str(pid) / "status").read_text()
        except OSError:
            continue
        counted += 1
        ticks += cpu_ticks(fields)
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1])
                rss_sum += peak
                rss_max = max(rss_max, peak)
    return Usage(ticks / ticks_per_second, rss_sum, rss_max, counted)


def tree_usage(root: int | None) -> Usage:
    """The usage of the tree under *root* (nothing when there is no root)."""
    return usage(tree_pids(root)) if root is not None else Usage(0.0, 0, 0, 0)


def wait_until_idle(root: int | None, window: float = 0.2, busy: float = 0.02, timeout: float = 15.0) -> bool:
    """Wait until the tree under *root* used less than *busy* CPU seconds in the last
    *window* seconds (its processes have started: a worker importing Python for 0.3 s
    after the master said "daemon started" must not count as the load's), or until
    *timeout*.  True when it went idle."""
    deadline = time.monotonic() + timeout
    last = tree_usage(root).cpu_seconds
    while time.monotonic() < deadline:
        time.sleep(window)  # sampling CPU time over a window, with a deadline
        now = tree_usage(root).cpu_seconds
        if now - last < busy:
            return True
        last = now
    return False


# The kernel's automatic grouping of processes by session (sched(7), "The autogroup
# feature"): with it on, the scheduler shares the CPUs first between sessions, then
# between the threads of each.  Each MTA runs in a session of its own (Postfix's
# master calls setsid(), the bench starts trimail with one) and the load generator
# and the sink in the bench's: on a shared machine the generator then weighs as
# much as the whole MTA, all its processes together, and its wake-ups preempt the
# MTA's busiest threads.  Real clients are other machines and cost a gateway no
# CPU; with the grouping off every thread weighs the same.
AUTOGROUP = PROC / "sys" / "kernel" / "sched_autogroup_enabled"


def autogroup_state(path: Path = AUTOGROUP) -> str:
    """"on", "off", or "absent" (a kernel without the feature)."""
    try:
        return "on" if path.read_text().strip() == "1" else "off"
    except OSError:
        return "absent"


@contextmanager
def autogroup_off(wanted: bool, path: Path = AUTOGROUP) -> Iterator[str]:
    """While inside (when *wanted*), the kernel's autogroup feature off; restored to
    what it was after, also on an error.  Yields the state the runs see."""
    before = autogroup_state(path)
    if not wanted or before != "on":
        yield before
        return
    try:
        path.write_text("0\n")
    except OSError as exc:
        raise SystemExit(f"bench: --autogroup off needs root ({path}: {exc.strerror})") from exc
    try:
        yield autogroup_state(path)
    finally:
        path.write_text("1\n")


def interpreter(maps: Path = PROC / "self" / "maps") -> dict:
    """The Python that runs trimail (scripts/bench_mtas.py starts it with the bench's
    own ``sys.executable``): version, the real path, and whether libpython is a
    shared library.  How the interpreter was built moves trimail's figures: on
    this machine pyenv's build (shared libpython, no profile-guided optimisation)
    cost trimail's processes 10-20 % more user CPU than Debian 12's own python3.11
    (static, optimised), what ``python3 -m venv`` gives on a stock Debian."""
    try:
        shared = "libpython" in maps.read_text()
    except OSError:
        shared = None
    return {"version": sys.version.split()[0], "executable": os.path.realpath(sys.executable),
            "shared_libpython": shared}
