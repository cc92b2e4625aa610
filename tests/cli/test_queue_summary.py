"""`trimail queue summary` (Postfix's qshape): right, and in memory that does not
grow with the queue."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import trimail, write_main_cf
from tests.queue.bulk import fill_queue
from trimail.queue.ids import new_queue_id
from trimail.queue.reads import MessageInfo
from trimail.queue.store import Store

BUCKETS = (("5m", 300), ("1h", 3600), ("1d", 86400), ("older", float("inf")))


def old_summary(messages: list[MessageInfo], now: float) -> list[str]:
    """The summary as trimail printed it before it streamed (the whole queue in
    memory): the reference for the rows and their order."""
    table: dict[tuple[str, str], list[int]] = {}
    for m in messages:
        age = now - m.arrival_time
        column = next(i for i, (_, limit) in enumerate(BUCKETS) if age <= limit)
        for r in m.recipients:
            if r.status in ("pending", "deferred"):
                row = table.setdefault((m.state, r.address.rpartition("@")[2].lower()), [0] * len(BUCKETS))
                row[column] += 1
    lines = [f"{'queue':<10} {'domain':<32} {'total':>6} " + " ".join(f"{name:>6}" for name, _ in BUCKETS)]
    for (state, dom), row in sorted(table.items(), key=lambda item: (item[0][0], -sum(item[1]), item[0][1])):
        lines.append(f"{state:<10} {dom:<32} {sum(row):>6} " + " ".join(f"{n:>6}" for n in row))
    lines.append(f"{'':<10} {'TOTAL':<32} {sum(sum(row) for row in table.values()):>6}")
    return lines


def put(store: Store, state: str, age: float, recipients: list[tuple[str, str]], now: float) -> str:
    queue_id = new_queue_id()
    store.db.execute("INSERT INTO message (id, state, sender, arrival_time, size) VALUES (?, ?, '', ?, 10)",
                     (queue_id, state, now - age))
    for seq, (address, status) in enumerate(recipients):
        store.db.execute("INSERT INTO recipient (message_id, seq, address, status) VALUES (?, ?, ?, ?)",
                         (queue_id, seq, address, status))
    return queue_id


def small_queue(tmp_path: Path) -> Path:
    """Messages in every queue and age bucket (ages far from the bucket limits, so
    the seconds between building and reading change nothing)."""
    config_path = write_main_cf(tmp_path)
    store = Store.open(tmp_path / "queue")
    now = time.time()
    ages = (10, 1000, 10_000, 200_000)
    with store.transaction():
        for number in range(120):
            state = ("incoming", "deferred", "hold", "active", "maildrop")[number % 5]
            recipients = [(f"u{number}@D{number % 7}.example", "pending"),
                          (f"v{number}@d{number % 3}.example", "deferred" if state == "deferred" else "pending"),
                          (f"w{number}@sent.example", "sent"), (f'"x@y"@quoted{number % 2}.example', "bounced"),
                          (f'"a@b"@quoted{number % 2}.example', "pending")]
            put(store, state, ages[number % 4], recipients[: 1 + number % 5], now)
        put(store, "deferred", 10, [("done@gone.example", "sent")], now)  # nothing left: not shown
    store.close()
    return config_path


def test_summary_rows_and_order_are_those_of_the_in_memory_summary(tmp_path):
    config_path = small_queue(tmp_path)
    store = Store.open(tmp_path / "queue", readonly=True)
    expected = old_summary(store.list_messages(), time.time())
    store.close()
    result = trimail("queue", "summary", "-c", str(config_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == expected
    assert "gone.example" not in result.stdout and "sent.example" not in result.stdout


def test_summary_json_has_the_same_rows(tmp_path):
    config_path = small_queue(tmp_path)
    text = trimail("queue", "summary", "-c", str(config_path)).stdout.splitlines()
    result = trimail("queue", "summary", "--json", "-c", str(config_path))
    assert result.returncode == 0, result.stderr
    shape = json.loads(result.stdout)
    assert shape["buckets"] == ["5m", "1h", "1d", "older"]
    assert shape["dead_destinations"] is None  # serve is not running: not known
    rows = [[r["queue"], r["domain"], r["total"], *r["ages"]] for r in shape["rows"]]
    assert rows == [[line.split()[0], line.split()[1], *map(int, line.split()[2:])] for line in text[1:-1]]
    assert shape["total"] == int(text[-1].split()[-1]) == sum(r["total"] for r in shape["rows"])


def test_summary_counts_a_site_once_whatever_its_case_or_trailing_dot(tmp_path):
    """The domain column is the site `trimail queue flush -d` takes: lower case, no
    trailing dot (qshape strips it too)."""
    config_path = write_main_cf(tmp_path)
    store = Store.open(tmp_path / "queue")
    with store.transaction():
        for address in ("a@Site.example", "b@site.example.", "c@SITE.EXAMPLE..", "d@other.example"):
            put(store, "deferred", 10, [(address, "deferred")], time.time())
    store.close()
    lines = trimail("queue", "summary", "-c", str(config_path)).stdout.splitlines()
    assert [line.split()[:3] for line in lines[1:]] == [["deferred", "site.example", "3"],
                                                        ["deferred", "other.example", "1"], ["TOTAL", "4"]]


def test_summary_top_domains_folds_the_rest_into_one_row_per_queue(tmp_path):
    config_path = small_queue(tmp_path)
    full = trimail("queue", "summary", "-c", str(config_path)).stdout.splitlines()
    top = trimail("queue", "summary", "--top", "2", "-c", str(config_path)).stdout.splitlines()
    by_queue: dict[str, list[list[str]]] = {}
    for line in full[1:-1]:
        by_queue.setdefault(line.split()[0], []).append(line.split())
    expected = [full[0]]
    for queue, rows in by_queue.items():
        expected += [" ".join(r) for r in rows[:2]]
        if len(rows) > 2:
            folded = [sum(int(r[column]) for r in rows[2:]) for column in range(2, 7)]
            expected.append(" ".join([queue, f"({len(rows) - 2}", "others)", *map(str, folded)]))
    assert [" ".join(line.split()) for line in top[:-1]] == [" ".join(line.split()) for line in expected]
    assert top[-1] == full[-1]


def peak_rss_kib(args: list[str]) -> int:
    """Run ``trimail ARGS`` and return its peak resident set size (this child only)."""
    proc = subprocess.Popen([sys.executable, "-m", "trimail", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    proc.stderr.close()
    return usage.ru_maxrss


def test_summary_memory_does_not_grow_with_the_queue(tmp_path):
    """10^5 messages (about 140,000 recipients over 500 domains): the summary's peak
    RSS stays within a few MiB of the same command on an empty queue (it was 65 MiB
    more when the whole queue was read into memory)."""
    config_path = write_main_cf(tmp_path)
    Store.open(tmp_path / "queue").close()
    empty = peak_rss_kib(["queue", "summary", "-c", str(config_path)])
    fill_queue(tmp_path / "queue", 100_000)
    started = time.monotonic()
    full = peak_rss_kib(["queue", "summary", "-c", str(config_path)])
    took = time.monotonic() - started
    print(f"summary peak RSS: empty queue {empty // 1024} MiB, 10^5 messages {full // 1024} MiB, {took:.2f} s")
    assert full - empty < 20 * 1024, (empty, full)


async def test_dead_destinations_show_in_summary_status_and_metrics(start_mta):
    """The destinations serve holds dead (new mail deferred without a connection
    until their time) are shown by `queue summary` (text and JSON), `status` and
    the trimail_dead_destinations gauge; one whose time has passed is not."""
    import urllib.request

    import trio

    from trimail.delivery.outcome import Outcome
    from trimail.scheduler.destination import DeadSite

    srv = await start_mta(metrics_listen="127.0.0.1:0")
    config = srv.config.source

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return trimail(*args, "-c", config)

    none = json.loads((await trio.to_thread.run_sync(cli, "queue", "summary", "--json")).stdout)
    assert none["dead_destinations"] == [] and none["dead_destinations_total"] == 0  # running: none dead
    assert "dead" not in (await trio.to_thread.run_sync(cli, "queue", "summary")).stdout
    now = time.time()
    reason = "4.4.1 connect to dead.example[127.0.90.9]:25: Connection refused\x1b[2J"
    for key, until in ((("smtp", "dead.example"), now + 600), (("smtp", "back.example"), now - 1)):
        site = DeadSite(f"{key[0]}:{key[1]}", now - 30, until, reason)
        srv.scheduler.dead._dead[key] = (site, Outcome("deferred", "4.4.1", reason))
    text = await trio.to_thread.run_sync(cli, "queue", "summary")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[-2] == "dead destinations (deferred without a connection until the time shown): 1"
    assert lines[-1].split()[:3] == ["smtp:dead.example", "until", time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                   time.gmtime(now + 600))]
    assert "Connection refused?[2J)" in lines[-1] and "\x1b" not in text.stdout  # printable only
    shape = json.loads((await trio.to_thread.run_sync(cli, "queue", "summary", "--json")).stdout)
    assert shape["dead_destinations_total"] == 1
    [dead] = shape["dead_destinations"]
    assert dead == {"destination": "smtp:dead.example", "reason": reason,
                    "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 30)),
                    "until": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 600))}
    status = await trio.to_thread.run_sync(cli, "status", "--json")
    facts = json.loads(status.stdout)
    assert facts["running"] is True and facts["dead_destinations"] == [dead]
    assert facts["dead_destinations_total"] == 1 and facts["queue"]["deferred"] == 0
    plain = await trio.to_thread.run_sync(cli, "status")
    assert "dead destinations: 1 (trimail queue summary lists them)" in plain.stdout
    url = f"http://127.0.0.1:{srv.metrics_addresses[0].port}/metrics"
    scraped = await trio.to_thread.run_sync(lambda: urllib.request.urlopen(url, timeout=30).read().decode())
    assert "\ntrimail_dead_destinations 1.0\n" in scraped
