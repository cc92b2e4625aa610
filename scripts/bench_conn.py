"""The per-connection cost of ``trimail serve``: server CPU microseconds per
connection, for connect-banner-EHLO-QUIT sessions and for smtp-source's one
message per connection against many per connection (issue 16).

Each tree (``--tree``: a directory with a ``.venv`` where trimail is installed;
the default is this checkout) gets one ``trimail serve`` (single process,
``master_service_disable = qmgr``, a temporary queue) on ``127.0.22.1`` and a free
port; the runs alternate between the trees, and each figure is the server's own
CPU time (utime + stime from /proc/PID/stat) over the run divided by the number
of connections (or messages).  Load:

* ``conn``: client processes, each opening connections one after another:
  read the banner, ``EHLO``, ``QUIT``, read ``221``, close;
* ``msg1``: ``smtp-source -s 20 -m N -l 1024`` (one message per connection);
* ``msgN``: the same with ``-d`` (every message over the session's connection);
  ``msg1 - msgN`` per message is the per-connection cost with a message.

Example: ``python scripts/bench_conn.py --tree . --tree /tmp/base --runs 5``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOST = "127.0.22.1"
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


class Serve:
    def __init__(self, tree: Path, workdir: Path) -> None:
        self.tree = tree
        self.port = free_port()
        workdir.mkdir(parents=True)
        config = workdir / "main.cf"
        config.write_text(
            f"smtpd_listen = {HOST}:{self.port}\n"
            f"queue_directory = {workdir / 'queue'}\n"
            "myhostname = bench.example\n"
            "smtpd_workers = 0\n"
            "smtpd_client_connection_count_limit = 0\n"
            "smtpd_process_limit = 20000\n"
            "alias_maps =\nalias_database =\nlocal_recipient_maps =\n"
            "allow_root = yes\n"
            "master_service_disable = qmgr\n")
        self.log_path = workdir / "serve.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([str(tree / ".venv/bin/python"), "-m", "trimail", "serve", "-c", str(config)],
                                         stderr=log, stdout=subprocess.DEVNULL, cwd=tree)
        deadline = time.monotonic() + 30
        while "daemon started" not in self.log_path.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"bench_conn: serve in {tree} did not start:\n" + self.log_path.read_text())
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def _expect(sock: socket.socket, buf: bytes, code: bytes) -> bytes:
    """Read until a final reply line (``code`` + space); returns what follows it."""
    while True:
        start = 0
        while (end := buf.find(b"\r\n", start)) >= 0:
            line = buf[start:end]
            if line[3:4] == b" ":
                if not line.startswith(code):
                    raise SystemExit(f"bench_conn: server said {line!r}")
                return buf[end + 2:]
            start = end + 2
        data = sock.recv(65536)
        if not data:
            raise SystemExit("bench_conn: server closed the connection")
        buf += data


def _conn_worker(args: tuple[int, int]) -> int:
    port, count = args
    for _ in range(count):
        with socket.create_connection((HOST, port)) as sock:
            rest = _expect(sock, b"", b"220")
            sock.sendall(b"EHLO client.example\r\n")
            rest = _expect(sock, rest, b"250")
            sock.sendall(b"QUIT\r\n")
            _expect(sock, rest, b"221")
    return count


def load_conn(port: int, connections: int, clients: int) -> int:
    share = connections // clients
    with multiprocessing.Pool(clients) as pool:
        return sum(pool.map(_conn_worker, [(port, share)] * clients))


def load_smtp_source(port: int, messages: int, reuse: bool) -> int:
    subprocess.run(["smtp-source", *(["-d"] if reuse else []), "-s", "20", "-m", str(messages), "-l", "1024",
                    "-f", "bench@client.example", "-t", "sink@dest.example", f"{HOST}:{port}"],
                   check=True, stdout=subprocess.DEVNULL)
    return messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", type=Path, help="checkout with a .venv (repeatable)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--connections", type=int, default=3000, help="per conn run")
    parser.add_argument("--messages", type=int, default=2000, help="per msg1/msgN run")
    parser.add_argument("--clients", type=int, default=4, help="client processes for conn")
    parser.add_argument("--modes", default="conn,msg1,msgN")
    args = parser.parse_args()
    trees = [t.resolve() for t in (args.tree or [Path(__file__).resolve().parent.parent])]
    modes = args.modes.split(",")
    if {"msg1", "msgN"} & set(modes) and not shutil.which("smtp-source"):
        raise SystemExit("bench_conn: msg1/msgN need smtp-source (Debian package postfix)")
    figures: dict[tuple[Path, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="trimail-bench-conn-") as tmp:
        servers = {tree: Serve(tree, Path(tmp) / str(i)) for i, tree in enumerate(trees)}
        try:
            for server in servers.values():  # warm up: imports, first-use costs
                load_conn(server.port, 200, args.clients)
            for run in range(args.runs):
                for mode in modes:
                    for tree in (trees if run % 2 == 0 else trees[::-1]):
                        server = servers[tree]
                        before, began = cpu_seconds(server.proc.pid), time.perf_counter()
                        if mode == "conn":
                            count = load_conn(server.port, args.connections, args.clients)
                        else:
                            count = load_smtp_source(server.port, args.messages, reuse=mode == "msgN")
                        wall = time.perf_counter() - began
                        cpu = cpu_seconds(server.proc.pid) - before
                        figures.setdefault((tree, mode), []).append((cpu / count * 1e6, count / wall))
                        print(f"run {run} {mode:5} {tree}: {cpu / count * 1e6:7.0f} us/unit, "
                              f"{count / wall:7.0f}/s", flush=True)
        finally:
            for server in servers.values():
                server.stop()
    print("\nmedians (server CPU per connection or message; rate)")
    for tree in trees:
        line = [f"{tree}:"]
        for mode in modes:
            runs = figures[(tree, mode)]
            line.append(f"{mode} {statistics.median(r[0] for r in runs):.0f} us "
                        f"({statistics.median(r[1] for r in runs):.0f}/s)")
        if {"msg1", "msgN"} <= set(modes):
            per = [a[0] - b[0] for a, b in zip(figures[(tree, "msg1")], figures[(tree, "msgN")])]
            line.append(f"msg1-msgN {statistics.median(per):.0f} us")
        print("  ".join(line))


if __name__ == "__main__":
    sys.exit(main())
