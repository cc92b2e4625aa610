"""Lookup tables under fire: rebuilt while deliveries read them, and blocking for real.

A table rebuilt by ``trimail postmap``/``trimail newaliases`` while local
deliveries and SMTP sessions read it must cost nothing (every message is
delivered exactly once, serve stays up), and a lookup that blocks (a slow NSS,
a table file on a hung disk - here a FIFO nobody writes to) must stall only the
session that asked, which then gets its answer when the read completes or
``451 4.3.0`` when ``table_lookup_timeout`` runs out.
"""

from __future__ import annotations

import os
import smtplib
import threading
import time
from pathlib import Path

from tests.faults.conftest import assert_serving, integrity_ok, send, trimail_cmd, wait_until
from trimail.maps import RECHECK_SECONDS

TEAMS = 4
MEMBERS = 3


def _tables(tmp_path: Path) -> tuple[Path, Path]:
    aliases = tmp_path / "aliases"
    aliases.write_text("".join(
        f"team{t}: " + ", ".join(f"user{t}x{m}" for m in range(MEMBERS)) + "\n" for t in range(TEAMS)))
    virtual = tmp_path / "virtual"
    virtual.write_text("".join(f"v{t}@virtual.example team{t}@mx.test.example\n" for t in range(TEAMS)))
    return aliases, virtual


def _delivered(spool: Path) -> dict[str, list[str]]:
    """user -> the message tags in that user's Maildir/new, in any order."""
    found: dict[str, list[str]] = {}
    for new in spool.glob("*/Maildir/new"):
        for path in new.iterdir():
            text = path.read_bytes().decode("ascii", "replace")
            tag = text.split("tag=", 1)[1].split()[0] if "tag=" in text else "?"
            found.setdefault(new.parent.parent.name, []).append(tag)
    return found


def test_tables_rebuilt_again_and_again_under_local_delivery_load_lose_nothing(tmp_path, daemon):
    aliases, virtual = _tables(tmp_path)
    assert trimail_cmd("postalias", str(aliases)).returncode == 0
    assert trimail_cmd("postmap", str(virtual)).returncode == 0
    spool = tmp_path / "spool"
    d = daemon(mydestination="mx.test.example", alias_maps=f"hash:{aliases}", alias_database=f"hash:{aliases}",
               virtual_alias_maps=f"hash:{virtual}", local_recipient_maps="$alias_maps",
               local_destination_concurrency_limit=8, mail_spool_directory=str(spool))
    stop = threading.Event()
    rebuilds: list[int] = []

    def rebuild() -> None:  # what an operator's cron job or configuration tool does
        while not stop.is_set():
            first = trimail_cmd("newaliases", "-c", str(d.config_path))
            second = trimail_cmd("postmap", str(virtual))
            rebuilds.append(first.returncode | second.returncode)

    sent: dict[str, set[int]] = {}
    lock = threading.Lock()
    failures: list[BaseException] = []

    def client(worker: int) -> None:
        n = 0
        try:
            while not stop.is_set():
                tag = f"w{worker}n{n}"
                a, b = n % TEAMS, (n + worker + 1) % TEAMS
                if a == b:
                    b = (b + 1) % TEAMS
                send(d.port, [f"team{a}@mx.test.example", f"v{b}@virtual.example"],
                     body=f"Subject: load\r\n\r\ntag={tag} \r\n".encode())
                with lock:
                    sent[tag] = {a, b}
                n += 1
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    threads = [threading.Thread(target=rebuild)] + [threading.Thread(target=client, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(rebuilds) >= 5 or failures or not d.alive, timeout=120)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert not failures, (failures, "\n".join(d.proc.log[-40:]))
    assert d.alive, "serve exited:\n" + "\n".join(d.proc.log[-30:])
    assert rebuilds and not any(rebuilds)
    expected = {f"user{t}x{m}": sorted(tag for tag, teams in sent.items() if t in teams)
                for t in range(TEAMS) for m in range(MEMBERS)}
    total = sum(len(tags) for tags in expected.values())
    try:
        wait_until(lambda: sum(len(v) for v in _delivered(spool).values()) >= total or not d.alive, timeout=60)
    except AssertionError:
        pass  # the comparison below says what is missing
    trouble = [line for line in d.proc.log if "status=sent" not in line and " to=<" in line]
    assert {user: sorted(tags) for user, tags in _delivered(spool).items()} == expected, trouble[:10]
    assert_serving(d)
    assert integrity_ok(d.queue_directory) == "ok"


def _reply_in_thread(port: int, recipient: str) -> tuple[threading.Thread, dict[str, object]]:
    """A client that says RCPT TO:<recipient> in a thread; its reply lands in the dict."""
    result: dict[str, object] = {}
    ready = threading.Event()

    def run() -> None:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
                client.ehlo("client.example")
                result["mail"] = client.mail("alice@client.example")
                ready.set()
                result["rcpt"] = client.rcpt(recipient)
                client.rset()
        except BaseException as exc:
            result["error"] = exc
        finally:
            ready.set()

    thread = threading.Thread(target=run)
    thread.start()
    assert ready.wait(20)
    return thread, result


def _quick_session(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=5) as client:
        assert client.ehlo("other.example")[0] == 250
        assert client.noop()[0] == 250


def test_a_table_read_that_blocks_stalls_only_the_session_that_asked(tmp_path, daemon):
    table = tmp_path / "recipients"
    os.mkfifo(table)  # a table file whose read blocks until someone writes: a hung disk or NSS
    d = daemon(mydestination="mx.test.example", local_recipient_maps=f"texthash:{table}", alias_maps="")
    thread, result = _reply_in_thread(d.port, "known@mx.test.example")
    deadline = time.monotonic() + 20  # the stuck session got as far as MAIL (its queue ID comes at RCPT)
    while "mail" not in result:
        assert time.monotonic() < deadline, result
        time.sleep(0.01)
    _quick_session(d.port)  # another client is greeted and served while that RCPT waits
    assert "rcpt" not in result  # ... and the RCPT really is still waiting on the table
    with open(table, "w") as feed:  # the disk comes back
        feed.write("known@mx.test.example OK\n")
    thread.join(30)
    assert result.get("rcpt", (0,))[0] == 250, result
    assert_serving(d)


def test_a_table_read_that_never_returns_answers_451_after_the_lookup_timeout(tmp_path, daemon):
    table = tmp_path / "recipients"
    os.mkfifo(table)
    d = daemon(mydestination="mx.test.example", local_recipient_maps=f"texthash:{table}", alias_maps="",
               table_lookup_timeout="2s")
    thread, result = _reply_in_thread(d.port, "known@mx.test.example")
    _quick_session(d.port)
    thread.join(30)
    code, text = result.get("rcpt", (0, b""))  # type: ignore[misc]
    assert code == 451 and b"4.3.0" in text and b"Temporary lookup failure" in text, result
    d.proc.wait_log(r"local recipient lookup failed")
    assert_serving(d)
    try:  # release the blocked reader so nothing lingers
        fd = os.open(table, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
    except OSError:
        pass


def _corrupt(source: Path) -> float:
    """Replace a compiled table with bytes that are not a database (a bad copy, a
    disk error): the next reload of every reader meets it.  Returns when."""
    broken = source.with_name(source.name + ".broken")
    broken.write_bytes(b"this is not an SQLite database\n" * 200)
    os.replace(broken, source.with_name(source.name + ".db"))
    return time.monotonic()


def _rcpt(port: int, recipient: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.example")
        client.mail("alice@client.example")
        return client.rcpt(recipient)


def test_a_corrupt_table_costs_one_reply_or_one_deferral_never_the_daemon(tmp_path, daemon):
    access, local, aliases, transport = (tmp_path / name for name in ("access", "local", "aliases", "transport"))
    access.write_text("blocked@mx.test.example REJECT\n")
    local.write_text("ann@mx.test.example ann\n")
    aliases.write_text("ann: bob\n")
    transport.write_text("far.example error:5.0.0 nothing goes there\n")
    for table in (access, local, transport):
        assert trimail_cmd("postmap", str(table)).returncode == 0
    assert trimail_cmd("postalias", str(aliases)).returncode == 0
    d = daemon(mydestination="mx.test.example", local_recipient_maps=f"hash:{local}", alias_maps=f"hash:{aliases}",
               transport_maps=f"hash:{transport}", mail_spool_directory=str(tmp_path / "spool"),
               smtpd_recipient_restrictions=f"check_recipient_access hash:{access}, reject_unlisted_recipient, "
                                            "permit_mynetworks, reject_unauth_destination")
    assert _rcpt(d.port, "ann@mx.test.example")[0] == 250  # every table read once

    def answers(recipient: str, code: int) -> bool:
        return _rcpt(d.port, recipient)[0] == code

    def seen_by_all(changed: float, recipient: str, code: int) -> bool:
        """Every smtpd worker has looked at the table again since *changed* (each
        re-checks a table at most RECHECK_SECONDS after its last look) and answers *code*."""
        return time.monotonic() - changed > RECHECK_SECONDS and answers(recipient, code)

    changed = _corrupt(access)  # an access table: that RCPT gets 451 4.3.0
    wait_until(lambda: seen_by_all(changed, "ann@mx.test.example", 451), timeout=10)
    code, text = _rcpt(d.port, "ann@mx.test.example")
    assert code == 451 and text.startswith(b"4.3.0") and b"Temporary lookup failure" in text, text
    assert trimail_cmd("postmap", str(access)).returncode == 0
    changed = time.monotonic()
    wait_until(lambda: seen_by_all(changed, "ann@mx.test.example", 250), timeout=10)

    changed = _corrupt(local)  # local_recipient_maps, read by reject_unlisted_recipient and by smtpd itself
    wait_until(lambda: seen_by_all(changed, "ann@mx.test.example", 451), timeout=10)
    assert_serving(d)
    assert trimail_cmd("postmap", str(local)).returncode == 0
    changed = time.monotonic()
    wait_until(lambda: seen_by_all(changed, "ann@mx.test.example", 250), timeout=10)

    _corrupt(aliases)  # alias_maps at delivery: the recipient is deferred, the message kept
    _corrupt(transport)  # transport_maps at routing: the same
    queued = send(d.port, ["ann@mx.test.example", "someone@far.example"])
    d.proc.wait_log(rf"{queued}: to=<ann@mx.test.example>.*status=deferred")
    d.proc.wait_log(rf"{queued}: to=<someone@far.example>.*status=deferred")
    assert_serving(d)
    assert integrity_ok(d.queue_directory) == "ok"
