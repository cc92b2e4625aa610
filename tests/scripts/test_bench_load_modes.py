"""The load modes of ``scripts/bench``: the command line, the two connection modes
of both load generators, the tables, and the CPU and memory accounting of an MTA
that is a tree of processes (trimail's master and workers, Postfix's daemons).
The latency steps are timed against trimail.testing's TestMTA; no other MTA runs."""

from __future__ import annotations

import os
import resource
import socketserver
import subprocess
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import bench_args
import bench_load
import bench_matrix
import bench_procs

ADDRESS = "127.0.21.40"


def test_workers_and_reuse_options_are_parsed_into_lists() -> None:
    args = bench_args.parse(["--mode", "accept", "--workers", "0, 1,2,1", "--reuse", "no"])
    assert args.workers == ["0", "1", "2"] and args.reuse == ["no"]
    assert bench_args.parse(["--workers", "auto,2"]).workers == ["auto", "2"]
    assert bench_args.parse(["--reuse", "both"]).reuse == ["yes", "no"]
    assert bench_args.parse(["--reuse", "yes"]).reuse == ["yes"]


@pytest.mark.parametrize("argv", [["--workers", "-1"], ["--workers", "two"], ["--workers", ""],
                                  ["--reuse", "maybe"], ["--runs", "0"], ["--autogroup", "on"]])
def test_bad_options_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        bench_args.parse(argv)


def test_defaults_depend_on_the_mode() -> None:
    report = bench_args.parse([])
    assert report.modes == ["accept", "e2e", "latency"] and report.reuse == ["yes", "no"]
    assert report.sizes == [1024, 10240, 102400] and report.sessions == [1, 20, 100]
    assert report.workers == ["auto"] and report.mta == "both" and report.autogroup == "keep"
    assert bench_args.parse(["--autogroup", "off"]).autogroup == "off"
    assert [report.messages_for(size) for size in report.sizes] == [3000, 2000, 1000]
    scaling = bench_args.parse(["--mode", "scaling"])
    assert scaling.modes == ["accept"] and scaling.workers == ["0", "1", "2"] and scaling.mta == "trimail"
    assert scaling.sizes == [1024] and scaling.sessions == [20]
    assert scaling.messages_for(1024) == 10000  # a run of seconds for two workers too
    assert bench_args.parse(["--mode", "scaling", "--quick"]).messages_for(1024) == 1000
    assert bench_args.parse(["--mode", "scaling", "-m", "3000"]).messages_for(1024) == 3000
    quick = bench_args.parse(["--quick"])
    assert [quick.messages_for(size) for size in quick.sizes] == [1000, 600, 300]
    assert bench_args.parse(["--quick", "-m", "50"]).messages_for(102400) == 50
    assert bench_args.parse(["--mode", "storm"]).messages is None  # storm and queuelist have their own default


def test_the_interpreter_that_runs_trimail_is_named_with_how_libpython_is_linked(tmp_path: Path) -> None:
    maps = tmp_path / "maps"  # stands in for /proc/self/maps
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/libpython3.11.so.1.0\n")
    python = bench_procs.interpreter(maps)
    assert python["version"] == sys.version.split()[0] and python["shared_libpython"] is True
    assert Path(python["executable"]) == Path(os.path.realpath(sys.executable))
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/bin/python3.11\n")
    assert bench_procs.interpreter(maps)["shared_libpython"] is False
    assert bench_procs.interpreter(tmp_path / "absent")["shared_libpython"] is None


def test_autogroup_off_turns_the_feature_off_inside_and_restores_it_after_an_error(tmp_path: Path) -> None:
    setting = tmp_path / "sched_autogroup_enabled"  # stands in for /proc/sys/kernel/...
    setting.write_text("1\n")
    with pytest.raises(RuntimeError), bench_procs.autogroup_off(True, setting) as state:
        assert state == "off" and setting.read_text() == "0\n"
        raise RuntimeError("a run failed")
    assert setting.read_text() == "1\n"
    with bench_procs.autogroup_off(False, setting) as state:  # keep: untouched
        assert state == "on" and setting.read_text() == "1\n"
    setting.write_text("0\n")
    with bench_procs.autogroup_off(True, setting) as state:  # already off: left off
        assert state == "off"
    assert setting.read_text() == "0\n"
    with bench_procs.autogroup_off(True, tmp_path / "absent") as state:
        assert state == "absent"


@pytest.mark.skipif(os.geteuid() != 0 or bench_procs.autogroup_state() != "on",
                    reason="needs root and a kernel with autogroup on")
def test_autogroup_off_changes_the_kernel_setting_for_the_runs_only() -> None:
    with bench_procs.autogroup_off(True) as state:
        assert state == "off" == bench_procs.autogroup_state()
    assert bench_procs.autogroup_state() == "on"


def test_smtp_source_disconnects_after_each_message_unless_told_to_reuse() -> None:
    reuse = bench_load.smtp_source_command("127.0.21.1", 2525, 100, 20, 1024, "yes")
    single = bench_load.smtp_source_command("127.0.21.1", 2525, 100, 20, 1024, "no")
    assert "-d" in reuse and "-d" not in single  # smtp-source(1): -d "Don't disconnect after sending a message"
    assert [a for a in reuse if a != "-d"] == single
    assert single[-1] == "127.0.21.1:2525" and single[single.index("-m") + 1] == "100"
    with pytest.raises(ValueError):
        bench_load.smtp_source_command("127.0.21.1", 2525, 100, 20, 1024, "both")


def test_messages_are_shared_evenly_and_no_session_is_empty() -> None:
    assert bench_load.shares(10, 3) == [4, 3, 3]
    assert bench_load.shares(2, 20) == [1, 1]
    assert sum(bench_load.shares(3000, 100)) == 3000


class CountingSMTP(socketserver.ThreadingTCPServer):
    """An SMTP server that says yes to everything and counts connections and messages."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__((ADDRESS, 0), CountingHandler)
        self.lock = threading.Lock()
        self.connections = self.messages = 0


class CountingHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        server: CountingSMTP = self.server  # type: ignore[assignment]
        self.request.settimeout(10)
        with server.lock:
            server.connections += 1
        self.wfile.write(b"220 counting ESMTP\r\n")
        in_data = False
        for line in self.rfile:
            if in_data:
                if line == b".\r\n":
                    in_data = False
                    with server.lock:
                        server.messages += 1
                    self.wfile.write(b"250 2.0.0 queued\r\n")
            elif line.upper().startswith(b"DATA"):
                in_data = True
                self.wfile.write(b"354 go ahead\r\n")
            elif line.upper().startswith(b"QUIT"):
                self.wfile.write(b"221 bye\r\n")
                return
            else:
                self.wfile.write(b"250 ok\r\n")


@pytest.mark.parametrize(("reuse", "connections"), [("yes", 3), ("no", 10)])
def test_builtin_client_reuses_connections_only_when_told(reuse: str, connections: int) -> None:
    server = CountingSMTP()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        complaints = bench_load.run_builtin(ADDRESS, server.server_address[1], 10, 3, 300, reuse)
    finally:
        server.shutdown()
        server.server_close()
    assert complaints == []
    assert (server.connections, server.messages) == (connections, 10)


def cell(mode: str, reuse: str, runs: dict[str, list[dict]]) -> dict:
    key = {"mode": mode, "size": 1024, "sessions": 20, "messages": 100, "reuse": reuse}
    return bench_matrix.summarise(key, runs, bench_matrix.LOAD_METRICS)


def run(rate: float, cpu: float) -> dict:
    return {"rate": rate, "cpu_per_1000": cpu, "peak_rss_mib": 40.0, "largest_rss_mib": 30.0}


def test_a_cell_keeps_every_run_and_compares_medians_with_postfix() -> None:
    summary = cell("accept", "no", {"trimail, workers 2": [run(300, 2), run(100, 1), run(200, 3)],
                                    "postfix": [run(100, 4), run(80, 4), run(120, 4)]})
    rate = summary["figures"]["trimail, workers 2"]["rate"]
    assert (rate["median"], rate["min"], rate["max"], rate["runs"]) == (200, 100, 300, [300, 100, 200])
    assert summary["ratio"]["trimail, workers 2"]["rate"] == 2.0
    assert summary["ratio"]["trimail, workers 2"]["cpu_per_1000"] == 0.5
    assert len(summary["runs"]["postfix"]) == 3 and "postfix" not in summary["ratio"]
    # each round's runs compared with each other: 300/100, 100/80, 200/120
    rounds = summary["round_ratio"]["trimail, workers 2"]["rate"]
    assert (rounds["median"], rounds["min"], rounds["max"]) == (200 / 120, 1.25, 3.0)
    assert "postfix" not in summary["round_ratio"]


def test_the_table_has_a_row_per_connection_mode_worker_count_and_figure() -> None:
    cells = [cell("accept", reuse, {"trimail, workers 0": [run(100, 2)] * 3,
                                    "trimail, workers 2": [run(180, 2)] * 3, "postfix": [run(90, 3)] * 3})
             for reuse in ("yes", "no")]
    lines = bench_matrix.matrix_table(cells)
    assert lines[0] == ("| test | connections | trimail workers | figure | trimail median (min–max) "
                        "| postfix median (min–max) | trimail / postfix (rounds) |")
    assert len(lines) == 2 + 2 * 2 * 3  # connection modes x worker counts x figures
    assert "| accept: 1 KiB, 20 sessions | reuse (-d) | 0 | msg/s | 100 (100–100) | 90 (90–90) | 1.11 (1.11–1.11) |" in lines
    assert "| accept: 1 KiB, 20 sessions | one per message | 2 | msg/s | 180 (180–180) | 90 (90–90) | 2.00 (2.00–2.00) |" in lines
    alone = bench_matrix.matrix_table([cell("accept", "no", {"trimail, workers 1": [run(100, 2)]})])
    assert alone[0].endswith("| trimail median (min–max) |") and alone[2].count("|") == 6


def test_the_scaling_table_compares_two_workers_with_one_and_cpu_with_the_single_process() -> None:
    cells = [cell("accept", "no", {"trimail, workers 0": [run(100, 2.0)] * 3,
                                   "trimail, workers 1": [run(110, 2.2)] * 3,
                                   "trimail, workers 2": [run(176, 1.8)] * 3}),
             cell("e2e", "no", {"trimail, workers 1": [run(1, 1)]})]
    lines = bench_matrix.scaling_table(cells)
    assert len([line for line in lines if line.startswith("| accept")]) == 3
    assert not any(line.startswith("| e2e") for line in lines)
    two = next(line for line in lines if line.startswith("| accept: 1 KiB, 20 sessions | one per message | 2 |"))
    assert "| 176 (176–176) | 1.60 | 1.80 (1.80–1.80) | 0.90 |" in two
    assert lines[-1] == ("accept: 1 KiB, 20 sessions, one per message: 2 workers / 1 = 1.60× msg/s (goal ≥ 1.5); "
                         "CPU per 1,000 at 2 workers / at 0 = 0.90 (goal ≤ 1.0)")
    noisy = cell("accept", "yes", {"trimail, workers 1": [run(100, 2), run(200, 2), run(150, 2)],
                                   "trimail, workers 2": [run(190, 2), run(300, 2), run(250, 2)]})
    assert bench_matrix.scaling_table([noisy])[-1].endswith(
        "2 workers / 1 = 1.67× msg/s (goal ≥ 1.5) [the min–max ranges overlap: within this machine's noise]")


def test_stat_fields_survive_a_command_name_with_parentheses_and_spaces() -> None:
    fields = bench_procs.stat_fields("42 (a) b (c)) S 1 42 42 0 -1 0 0 0 0 0 7 3 5 1 20")
    assert fields[0] == "S" and fields[1] == "1" and bench_procs.cpu_ticks(fields) == 16


TREE = r"""
import os, sys, time

def burn(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass

done = os.fork()
if done == 0:  # a worker that exits during the run: reaped, so in the root's cutime
    burn(0.3)
    os._exit(0)
os.waitpid(done, 0)
ready_r, ready_w = os.pipe()
alive = os.fork()
if alive == 0:  # a worker still running when the bench looks
    burn(0.3)
    memory = b"x" * (64 << 20)
    os.write(ready_w, b"!")
    sys.stdin.buffer.read()
    os._exit(0)
os.read(ready_r, 1)
burn(0.1)
print("ready", flush=True)
sys.stdin.buffer.read()
os.waitpid(alive, 0)
"""


def test_cpu_and_memory_count_every_process_of_the_tree_as_the_kernel_does() -> None:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen([sys.executable, "-c", TREE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            start_new_session=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        pids = bench_procs.tree_pids(proc.pid)
        figures = bench_procs.usage(pids)
        root_alone = bench_procs.stat_fields(Path(f"/proc/{proc.pid}/stat").read_text())
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(30)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    kernel = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    assert len(pids) == 2 and proc.pid in pids and os.getpid() not in pids
    own = (int(root_alone[11]) + int(root_alone[12])) / os.sysconf("SC_CLK_TCK")
    assert own < 0.35  # the root's own time alone (what the bench counted before) misses 0.6 s
    assert figures.cpu_seconds >= 0.65  # 0.3 (exited) + 0.3 (alive) + 0.1 (root)
    assert abs(figures.cpu_seconds - kernel) < 0.15  # getrusage(RUSAGE_CHILDREN) once all have exited
    assert figures.peak_rss_max_kib >= 64 << 10 and figures.peak_rss_sum_kib > figures.peak_rss_max_kib
    assert figures.processes == 2


ORPHAN = r"""
import os, sys
if os.fork() == 0:  # outlives the root, re-parented away from it
    sys.stdin.buffer.read()
    os._exit(0)
print("ready", flush=True)
"""


def test_a_process_that_outlives_its_parent_is_still_found_by_its_session() -> None:
    proc = subprocess.Popen([sys.executable, "-c", ORPHAN], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            start_new_session=True)
    assert proc.stdout is not None and proc.stdin is not None
    try:
        assert proc.stdout.readline() == b"ready\n"
        proc.wait(30)
        orphans = bench_procs.tree_pids(proc.pid)
        assert len(orphans) == 1 and orphans[0] != proc.pid
    finally:
        proc.stdin.close()
        proc.stdout.read()  # EOF once the orphan, which holds the pipe too, has exited


STARTING = r"""
import sys, time
end = time.process_time() + 0.4  # a worker's start-up
while time.process_time() < end:
    pass
sys.stdin.buffer.read()
"""


def test_the_load_is_measured_only_once_the_mta_has_finished_starting() -> None:
    proc = subprocess.Popen([sys.executable, "-c", STARTING], stdin=subprocess.PIPE, start_new_session=True)
    assert proc.stdin is not None
    try:
        assert bench_procs.wait_until_idle(proc.pid, timeout=10)
        assert bench_procs.tree_usage(proc.pid).cpu_seconds >= 0.4
    finally:
        proc.stdin.close()
        proc.wait(30)


@pytest.mark.parametrize("reuse", ["yes", "no"])
def test_latency_times_every_step_of_one_message_at_a_time(reuse: str) -> None:
    """``measure_latency`` against a real MTA (trimail.testing's): p50 and p99 of the
    whole and the p50 of each step; a connection's steps only without reuse."""
    from trimail.testing import TestMTA

    with TestMTA(smtpd_listen=f"{ADDRESS}:0") as mta:
        figures = bench_load.measure_latency(mta.host, mta.port, reuse, count=6)
        assert len(mta.messages) == 6
    per_message = {"mail", "rcpt", "data", "dot"}
    steps = per_message | ({"connect", "ehlo", "quit"} if reuse == "no" else set())
    assert set(figures) == {"p50", "p99"} | steps
    assert all(value > 0 for value in figures.values())
    assert figures["p50"] > max(figures[step] for step in per_message)  # the whole holds them
    assert set(bench_matrix.latency_metrics(reuse)) == {"latency_p50_ms", "latency_p99_ms"} | {
        f"step_{step}_ms" for step in steps}
