"""trimail-only figures of ``scripts/bench``: ``--mode queuelist`` (``trimail queue list`` on a long
queue) and ``--mode idle`` (serve's memory with many idle SMTP sessions).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_procs import tree_pids


def bench_queue_list(count: int) -> dict:
    """`trimail queue list` on a queue of *count* messages: time to the first line and to the end."""
    from trimail.queue.ids import new_queue_id
    from trimail.queue.spool import Spool
    from trimail.queue.store import NewMessage, Store

    with tempfile.TemporaryDirectory(prefix="trimail-bench-") as tmp:
        store = Store.open(Path(tmp) / "queue")
        with store.transaction():
            for i in range(count):
                spool = Spool()
                spool.write(b"Subject: x\r\n\r\nbody\r\n")
                store.insert_message(NewMessage(new_queue_id(), "a@client.example", [f"r{i}@far.example"], spool))
        store.close()
        config = Path(tmp) / "main.cf"
        config.write_text(f"queue_directory = {Path(tmp) / 'queue'}\n")
        results = []
        for json_flag in ([], ["--json"]):
            started = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-m", "trimail", "queue", "list", *json_flag, "-c", str(config)],
                                    stdout=subprocess.PIPE)
            assert proc.stdout is not None
            proc.stdout.read(1)
            first = time.perf_counter() - started
            size = 1 + len(proc.stdout.read())
            proc.wait()
            results.append({"format": "json" if json_flag else "mailq", "first_byte_s": first,
                            "total_s": time.perf_counter() - started, "bytes": size})
    for r in results:
        print(f"queue list ({r['format']}) of {count} messages: first output after {r['first_byte_s']:.3f} s, "
              f"all {r['bytes']} bytes after {r['total_s']:.2f} s")
    return {"messages": count, "results": results}


def bench_idle_sessions(count: int, start: Callable[[Path], Any]) -> dict:
    """Hold *count* idle SMTP sessions open against a serve that *start* runs in a
    directory (bench_mtas's ``Trimail``) and report its memory per session (the
    resident memory of all its processes)."""
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with tempfile.TemporaryDirectory(prefix="trimail-bench-") as tmp:
        mta = start(Path(tmp))
        try:
            def rss_kib() -> int:
                """Resident memory now, summed over serve's processes (its workers hold the sessions)."""
                total = 0
                for pid in tree_pids(mta.root_pid()):
                    try:
                        status = Path(f"/proc/{pid}/status").read_text()
                    except OSError:
                        continue
                    total += sum(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
                return total

            before = rss_kib()
            sockets = []
            for _ in range(count):
                sock = socket.create_connection((mta.address, mta.port), timeout=30)
                sockets.append(sock)
            for sock in sockets:  # every session greeted: they are all really open
                if not sock.recv(64).startswith(b"220"):
                    raise SystemExit("bench: a session was not greeted with 220")
            after = rss_kib()
            for sock in sockets:
                sock.close()
        finally:
            mta.stop()
    per_session = (after - before) * 1024 / count
    print(f"{count} idle sessions: serve RSS {before / 1024:.1f} MiB -> {after / 1024:.1f} MiB, "
          f"{per_session / 1024:.1f} KiB per session")
    return {"sessions": count, "rss_before_kib": before, "rss_after_kib": after, "bytes_per_session": per_session}
