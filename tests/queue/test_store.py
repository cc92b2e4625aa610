"""The queue database: schema, permissions, transitions, and group commit."""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Awaitable, Callable
from functools import partial

import apsw
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from trimail.errors import StorageError
from trimail.queue import transitions
from trimail.queue.database import QueueError
from trimail.queue.ids import is_queue_id, new_queue_id
from trimail.queue.inline import BookkeepingWriter, InlineWriter
from trimail.queue.schema import MIGRATIONS, SCHEMA_VERSION
from trimail.queue.spool import Spool
from trimail.queue.store import NewMessage, Store, TransitionError
from trimail.queue.writer import QueueWriter


def message(sender="a@example.org", recipients=("b@example.com",), content=b"Subject: x\r\n\r\nbody\r\n",
            spool_limit=256 * 1024, directory=None) -> NewMessage:
    spool = Spool(directory, memory_limit=spool_limit)
    spool.write(content)
    return NewMessage(new_queue_id(), sender, list(recipients), spool)


def insert(store: Store, msg: NewMessage) -> None:
    with store.transaction():
        store.insert_message(msg)


@given(st.integers(min_value=0, max_value=51**14 - 1))
def test_a_queue_id_spells_its_microseconds_and_counter_digit_by_digit(value):
    """The encoding (two digits at a time, the time's first six digits kept) is the
    plain base-51 spelling in ALPHABET, the highest digit first."""
    from trimail.queue import ids

    def spelt(number, digits):
        text = ""
        for _ in range(digits):
            number, digit = divmod(number, len(ids.ALPHABET))
            text = ids.ALPHABET[digit] + text
        return text

    assert ids._encode(value, 14) == spelt(value, 14)
    before = time.time_ns() // 1000
    queue_id = new_queue_id()
    after = time.time_ns() // 1000
    assert spelt(before, 10) <= queue_id[:10] <= spelt(after, 10)


def test_queue_ids_are_unique_sortable_and_short():
    ids = [new_queue_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(is_queue_id(i) and len(i) == 14 for i in ids)


def test_directory_is_0700_and_database_0600(tmp_path):
    qdir = tmp_path / "queue"
    store = Store.open(qdir)
    insert(store, message())
    assert stat.S_IMODE(qdir.stat().st_mode) == 0o700
    for name in os.listdir(qdir):
        assert stat.S_IMODE((qdir / name).stat().st_mode) == 0o600, name
    store.close()


def test_existing_directory_is_tightened(tmp_path):
    qdir = tmp_path / "queue"
    qdir.mkdir(mode=0o755)
    Store.open(qdir).close()
    assert stat.S_IMODE(qdir.stat().st_mode) == 0o700


def test_database_is_wal_with_full_sync(tmp_path):
    store = Store.open(tmp_path)
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert store.db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_newer_schema_is_refused(tmp_path):
    Store.open(tmp_path).close()
    db = apsw.Connection(str(tmp_path / "queue.db"))
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(QueueError, match="newer than this trimail"):
        Store.open(tmp_path)


def test_readonly_open_of_missing_queue_says_why(tmp_path):
    with pytest.raises(QueueError, match="no queue database"):
        Store.open(tmp_path / "nowhere", readonly=True)


def test_insert_and_list_round_trip(tmp_path):
    store = Store.open(tmp_path)
    msg = message(recipients=[f"r{i}@example.com" for i in range(100)])
    insert(store, msg)
    [info] = store.list_messages()
    assert info.id == msg.id and info.state == "incoming" and info.sender == "a@example.org"
    assert info.size == len(b"Subject: x\r\n\r\nbody\r\n")
    assert [r.address for r in info.recipients] == [f"r{i}@example.com" for i in range(100)]
    assert all(r.status == "pending" and r.attempts == 0 for r in info.recipients)
    assert store.read_content(msg.id) == b"Subject: x\r\n\r\nbody\r\n"


def test_large_message_goes_through_a_spool_file_and_blob_io(tmp_path):
    content = os.urandom(3 * 1024 * 1024 + 17)
    msg = message(content=content, spool_limit=64 * 1024, directory=tmp_path)
    assert msg.content.getvalue() is None  # spilled to a file
    store = Store.open(tmp_path / "q")
    insert(store, msg)
    assert store.read_content(msg.id) == content


def test_null_sender_is_listed_as_empty_string(tmp_path):
    store = Store.open(tmp_path)
    insert(store, message(sender=""))
    assert store.list_messages()[0].to_json()["sender"] == ""


def test_done_messages_are_not_listed(tmp_path):
    store = Store.open(tmp_path)
    msg = message()
    insert(store, msg)
    store.db.execute("UPDATE recipient SET status = 'sent' WHERE message_id = ?", (msg.id,))
    assert store.list_messages() == []


def test_transition_checks_the_expected_state(tmp_path):
    store = Store.open(tmp_path)
    msg = message()
    insert(store, msg)
    store.transition(msg.id, "incoming", "active")
    with pytest.raises(TransitionError):
        store.transition(msg.id, "incoming", "active")


def test_active_rows_are_recovered_as_incoming(tmp_path):
    store = Store.open(tmp_path)
    msg = message()
    insert(store, msg)
    store.transition(msg.id, "incoming", "active")
    store.close()
    reopened = Store.open(tmp_path)
    assert reopened.recover_active() == 1
    assert reopened.list_messages()[0].state == "incoming"


def test_due_deferred_rows_are_found_through_the_deferred_index(tmp_path):
    store = Store.open(tmp_path)
    for query in ("SELECT id FROM message WHERE state = 'deferred' AND next_attempt <= ? ORDER BY next_attempt",
                  "UPDATE message SET state = 'incoming' WHERE rowid IN (SELECT rowid FROM message"
                  " WHERE state = 'deferred' AND next_attempt <= ? ORDER BY next_attempt LIMIT 10)"):
        plan = store.db.execute(f"EXPLAIN QUERY PLAN {query}", (0.0,)).fetchall()
        detail = " ".join(row[-1] for row in plan)
        assert "INDEX message_deferred (state=? AND next_attempt<?)" in detail, detail
        assert "TEMP B-TREE" not in detail  # no sort of the due rows
    plan = store.db.execute("EXPLAIN QUERY PLAN SELECT min(next_attempt) FROM message WHERE state = 'deferred'")
    assert "INDEX message_deferred" in " ".join(row[-1] for row in plan)


def test_the_next_attempt_index_holds_deferred_messages_only(tmp_path):
    """A new message, its claim and its removal leave the next-attempt index alone
    (one page less each to write); deferring puts the message in it, and a claim
    takes it out."""
    store = Store.open(tmp_path)

    def entries() -> int:  # the cells of the index's b-tree, read by SQLite's dbstat
        return store.db.execute("SELECT sum(ncell) FROM dbstat WHERE name = 'message_deferred'").fetchone()[0]

    new, later = message(), message()
    insert(store, new)
    insert(store, later)
    assert entries() == 0
    with store.transaction():
        store.db.execute("UPDATE message SET state = 'deferred', next_attempt = 50 WHERE id = ?", (later.id,))
    assert entries() == 1
    claimed = [m.id for m in transitions.claim(store, 10, now=100.0)]
    assert sorted(claimed) == sorted([new.id, later.id])
    assert entries() == 0


def test_a_schema_5_queue_upgrades_to_the_deferred_index(tmp_path):
    """A queue written before the deferred-only index: the old (state, next_attempt)
    index goes, the new one is built from the deferred messages already queued, and
    they are found and claimed through it."""
    db = apsw.Connection(str(tmp_path / "queue.db"))
    for number, migration in enumerate(MIGRATIONS[:5]):
        db.execute(migration)
        db.execute(f"PRAGMA user_version = {number + 1:d}")
    db.executemany("INSERT INTO message (id, state, sender, arrival_time, next_attempt, size) VALUES (?, ?, '', 1, ?, 1)",
                   [("M1", "deferred", 30.0), ("M2", "incoming", None), ("M3", "deferred", 10.0),
                    ("M4", "deferred", 500.0), ("M5", "hold", 5.0)])
    db.execute("INSERT INTO body (message_id, content) SELECT id, x'00' FROM message")
    db.close()
    store = Store.open(tmp_path)
    names = {row[0] for row in store.db.execute("SELECT name FROM sqlite_schema WHERE type = 'index'")}
    assert "message_deferred" in names and "message_state_next_attempt" not in names
    assert store.db.execute("SELECT id FROM message INDEXED BY message_deferred WHERE state = 'deferred'"
                            " ORDER BY next_attempt").fetchall() == [("M3",), ("M1",), ("M4",)]
    assert transitions.next_due(store) == 10.0
    assert [m.id for m in transitions.claim(store, 10, now=100.0)] == ["M2", "M3", "M1"]


def test_unknown_state_is_refused_by_the_schema(tmp_path):
    store = Store.open(tmp_path)
    msg = message()
    msg.state = "limbo"
    with pytest.raises(apsw.ConstraintError):
        insert(store, msg)


# -- group commit -------------------------------------------------------------------


class Gate:
    """Holds the writer thread inside a request until the test opens it."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()

    def hold(self, store: Store) -> None:
        self.entered.set()
        self.opened.wait(10)

    async def wait_entered(self) -> None:
        assert await trio.to_thread.run_sync(self.entered.wait, 5)

    async def batched(self, writer: QueueWriter, *calls: Callable[[], Awaitable[object]]) -> None:
        """Hold the writer with one request, queue *calls* behind it, then let it go:
        they all land in one batch."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run, self.hold)
            await self.wait_entered()
            for call in calls:
                nursery.start_soon(call)
            with trio.fail_after(5):
                while writer._requests.qsize() < len(calls):
                    await trio.sleep(0.001)
            self.opened.set()


async def test_group_commit_puts_waiting_requests_in_one_transaction(tmp_path):
    gate = Gate()

    async with QueueWriter(lambda: Store.open(tmp_path)) as writer:
        done: list[str] = []

        async def submit(msg: NewMessage) -> None:
            await writer.run(Store.insert_message, msg)
            done.append(msg.id)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run, gate.hold)
            await gate.wait_entered()
            messages = [message() for _ in range(50)]
            for msg in messages:
                nursery.start_soon(submit, msg)
            with trio.fail_after(5):
                while writer._requests.qsize() < 50:
                    await trio.sleep(0.001)
            assert done == []  # nobody is answered before their commit
            gate.opened.set()
        assert sorted(done) == sorted(m.id for m in messages)
        assert writer.stats.largest_batch == 50
        assert writer.stats.batches == 2
    assert len(Store.open(tmp_path).list_messages()) == 50


def synchronous(store: Store) -> int:
    return store.db.execute("PRAGMA synchronous").fetchone()[0]  # 1 NORMAL, 2 FULL


def syncs(store: Store) -> tuple[int, int, Store]:
    """PRAGMA synchronous, how many times the connection fsynced its WAL so far, and it."""
    return synchronous(store), store.wal_syncs, store


async def test_only_batches_of_bookkeeping_alone_skip_the_fsync(tmp_path):
    """An accepted message is fsynced before run() returns: the writer commits with
    synchronous=NORMAL and then fsyncs the WAL itself, outside the write lock.  The
    scheduler's bookkeeping (durable=False) commits with NORMAL and no fsync, in a
    transaction of its own even when it waited beside durable work (which commits
    first)."""
    gate = Gate()
    async with QueueWriter(lambda: Store.open(tmp_path)) as writer:
        level, before, store = await writer.run(syncs)
        assert level == 1
        assert store.wal_syncs == before + 1  # fsynced before run() returned
        assert (await writer.run(syncs, durable=False))[:2] == (1, before + 1)
        assert store.wal_syncs == before + 1  # bookkeeping: no fsync
        assert (await writer.run(syncs))[:2] == (1, before + 1)
        assert store.wal_syncs == before + 2
        seen: list[int] = []

        async def submit(durable: bool) -> None:
            seen.append((await writer.run(syncs, durable=durable))[1])

        await gate.batched(writer, partial(submit, False), partial(submit, True), partial(submit, False))
        # the gate's request and the durable one fsynced (one batch each), the bookkeeping not,
        # and the bookkeeping ran after the durable request's fsync
        assert store.wal_syncs == before + 4
        assert sorted(seen) == [before + 3, before + 4, before + 4]
        assert writer.stats.durable_batches == writer.stats.batches - 2


def test_the_fsync_outside_the_lock_syncs_the_wal_sqlite_writes(tmp_path):
    """sync_commits_itself: NORMAL from then on (set_durable no longer brings FULL
    back), and the descriptor sync_wal fsyncs is the WAL file SQLite appends to; an
    ordinary connection keeps FULL and sync_wal does nothing on it."""
    store, plain = Store.open(tmp_path), Store.open(tmp_path)
    try:
        store.sync_commits_itself()
        store.set_durable(True)
        assert synchronous(store) == 1
        wal = os.fstat(store._wal)
        assert (wal.st_dev, wal.st_ino) == (os.stat(store.db.filename_wal).st_dev,
                                            os.stat(store.db.filename_wal).st_ino)
        store.sync_wal()
        assert store.wal_syncs == 1
        plain.set_durable(True)
        plain.sync_wal()
        assert (synchronous(plain), plain.wal_syncs) == (2, 0)
    finally:
        store.close()
        plain.close()
    assert store._wal is None  # closed with the connection
    again = Store.open(tmp_path)  # the last close removed the WAL: opening makes it again
    try:
        again.sync_commits_itself()
        assert again._wal is not None and synchronous(again) == 1
    finally:
        again.close()


def test_the_wal_descriptor_stays_the_wal_while_other_processes_come_and_go(tmp_path):
    """SQLite deletes the WAL as the last connection closes: another process that
    opens, writes and closes (``trimail sendmail``, the system sqlite3 tool) must not
    leave the writer fsyncing a file no longer there."""
    import subprocess
    import sys

    store = Store.open(tmp_path)
    try:
        store.sync_commits_itself()
        wal = store.db.filename_wal
        code = ("import apsw; from trimail.queue.store import Store; "
                f"b = Store.open({str(tmp_path)!r}); "
                "b.db.execute(\"INSERT INTO queue_count (state, messages) VALUES ('x', 1)\"); b.close(); "
                f"c = apsw.Connection({wal[:-4]!r}); c.execute('SELECT count(*) FROM message').fetchall(); c.close()")
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
        assert os.fstat(store._wal).st_ino == os.stat(wal).st_ino
        with store.transaction():
            store.db.execute("INSERT INTO queue_count (state, messages) VALUES ('y', 1)")
        store.sync_wal()
    finally:
        store.close()


def test_a_planted_wal_that_is_no_regular_file_keeps_full(tmp_path):
    """Root opens the WAL before the privilege drop, in mail_owner's directory: a
    symlink or a FIFO in its place is never opened, and the connection keeps FULL."""
    store = Store.open(tmp_path)
    wal = store.db.filename_wal
    os.rename(wal, wal + ".real")  # SQLite keeps its own descriptor; nothing runs meanwhile
    try:
        for plant in (lambda: os.symlink(wal + ".real", wal), lambda: os.mkfifo(wal)):
            plant()
            store.sync_commits_itself()
            assert store._wal is None and synchronous(store) == 2
            os.unlink(wal)
    finally:
        os.rename(wal + ".real", wal)
        store.close()


async def test_a_failing_wal_fsync_answers_the_batch_with_an_error(tmp_path):
    """fdatasync failing (EINVAL here: the descriptor made a pipe's) fails the durable
    batch with StorageError, so its 250 is never sent; the writer goes on."""
    async with QueueWriter(lambda: Store.open(tmp_path)) as writer:
        store = (await writer.run(syncs))[2]
        read, write = os.pipe()
        real, store._wal = store._wal, read
        try:
            with pytest.raises(StorageError):
                await writer.run(synchronous)
        finally:
            store._wal = real
            os.close(read)
            os.close(write)
        assert (await writer.run(syncs))[0] == 1


async def test_a_failing_request_does_not_spoil_its_batch(tmp_path):
    gate = Gate()
    async with QueueWriter(lambda: Store.open(tmp_path)) as writer:
        good, bad = message(), message()
        bad.state = "limbo"
        results: dict[str, object] = {}

        async def submit(msg: NewMessage) -> None:
            try:
                await writer.run(Store.insert_message, msg)
                results[msg.id] = "ok"
            except StorageError as exc:  # apsw's error, mapped at the queue's edge
                results[msg.id] = exc.__cause__

        await gate.batched(writer, partial(submit, bad), partial(submit, good))
        assert results[good.id] == "ok"
        assert isinstance(results[bad.id], apsw.ConstraintError)
    assert [m.id for m in Store.open(tmp_path).list_messages()] == [good.id]


async def test_writer_reports_an_unusable_queue(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(QueueError):
        async with QueueWriter(lambda: Store.open(tmp_path / "file" / "queue")):
            pass


async def test_a_failed_commit_is_rolled_back_and_the_next_batch_commits(tmp_path):
    """A COMMIT that fails (here a deferred foreign key; in life a full disk or an
    I/O error) must not leave the writer inside a dead transaction."""
    def broken(store: Store) -> None:
        store.db.execute("PRAGMA defer_foreign_keys = ON")  # the violation surfaces at COMMIT
        store.db.execute("INSERT INTO recipient (message_id, seq, address) VALUES ('nobody', 0, 'x@y')")

    async with QueueWriter(lambda: Store.open(tmp_path)) as writer:
        with trio.fail_after(10):
            with pytest.raises(StorageError, match="FOREIGN KEY"):
                await writer.run(broken)
            good = message()
            await writer.run(Store.insert_message, good)
            assert await writer.run(Store.counts) == {"incoming": 1}


async def test_a_dead_writer_thread_fails_its_waiters_instead_of_hanging(tmp_path):
    def fatal(store: Store) -> None:
        raise SystemExit("the thread dies")  # not an Exception: escapes every batch boundary

    with trio.fail_after(10):
        async with QueueWriter(lambda: Store.open(tmp_path)) as writer:
            with pytest.raises(StorageError, match="queue writer stopped"):
                await writer.run(fatal)
            with pytest.raises(StorageError, match="queue writer stopped"):
                await writer.run(Store.counts)
        # leaving the block (serve's stop) returned: nothing waits on the dead thread


def test_forked_processes_do_not_share_the_random_part_of_queue_ids() -> None:
    """The fork server's workers are forks of one process: each must count from a
    random start of its own, or two of them give one ID to two messages in the same
    microsecond (the second commit fails)."""
    import os

    from trimail.queue.ids import new_queue_id

    new_queue_id()  # the parent's counter is in use
    suffixes = []
    for _ in range(2):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            os.write(write_end, new_queue_id()[-4:].encode())
            os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            suffixes.append(pipe.read())
        os.waitpid(pid, 0)
    assert suffixes[0] != suffixes[1]  # equal by chance once in 6.8 million runs


@pytest.mark.parametrize("writer_class", [QueueWriter, InlineWriter, BookkeepingWriter])
async def test_a_request_alone_in_its_batch_that_fails_halfway_leaves_nothing(tmp_path, writer_class):
    """A batch of one runs without a savepoint of its own (its transaction is one):
    what it wrote before it failed is rolled back, its error is its caller's, and
    the writer goes on."""
    first = message()

    def halfway(store: Store) -> None:
        store.insert_message(first)  # written ...
        raise ValueError("a failure after writing")  # ... and undone

    def halfway_sql(store: Store) -> None:
        store.insert_message(first)
        store.db.execute("SELECT * FROM no_such_table")

    async with writer_class(lambda: Store.open(tmp_path)) as writer:
        with pytest.raises(ValueError, match="after writing"):
            await writer.run(halfway, durable=writer_class is not BookkeepingWriter)
        with pytest.raises(StorageError, match="no_such_table"):
            await writer.run(halfway_sql, durable=writer_class is not BookkeepingWriter)
        assert await writer.run(Store.counts) == {}
        second = message()
        await writer.run(Store.insert_message, second)
        assert [m.id for m in await writer.run(Store.list_messages)] == [second.id]


def test_a_backup_is_never_readable_by_others_while_it_is_written(tmp_path):
    """Red team 33b: ``trimail queue backup`` let SQLite create ``.NAME.partial`` (0644
    under the usual umask) and made it 0600 only once the copy was whole: any local
    user could open it during the copy and read every queued message.  A thread
    looks at the file for as long as the copy runs: it is 0600 whenever it exists."""
    from trimail.queue.backup import backup

    store = Store.open(tmp_path / "queue")
    for _ in range(40):  # 40 MiB of mail: the copy takes long enough to be seen
        insert(store, message(content=b"Subject: x\r\n\r\n" + os.urandom(1 << 20).hex().encode()[: 1 << 20],
                              directory=tmp_path))
    store.close()
    target = tmp_path / "out" / "copy.db"
    target.parent.mkdir()
    modes: set[tuple[str, int]] = set()  # (what, mode) of what the copy is written in
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            try:
                for entry in os.scandir(target.parent):
                    if entry.name != target.name:
                        modes.add(("dir" if entry.is_dir() else "beside", stat.S_IMODE(entry.stat().st_mode)))
            except FileNotFoundError:
                pass

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        backup(tmp_path / "queue", target)
    finally:
        done.set()
        watcher.join()
    assert modes == {("dir", 0o700)}, modes  # written in a directory nobody else may enter, nothing beside
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_a_listing_its_reader_stopped_reading_holds_no_snapshot(tmp_path):
    """Red team 33b: ``trimail queue list`` streamed its rows from one read snapshot,
    so ``mailq | less`` left open kept every later commit in the WAL (410 MB after
    6,000 messages), since no checkpoint may pass a reader.  A listing now reads a
    page at a time and holds nothing while its reader does not ask for more."""
    store = Store.open(tmp_path / "queue")
    with store.transaction():
        for n in range(250):
            store.insert_message(message(recipients=(f"r{n}@example.com",)))
    reader = Store.open(tmp_path / "queue", readonly=True)
    listing = reader.iter_messages(page=100)
    first = next(listing)  # ... and the reader stops there, as a pager does
    insert(store, message())  # serve goes on committing
    busy, frames, copied = store.db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    assert busy == 0 and frames > 0 and copied == frames, (busy, frames, copied)
    assert [first.id, *(m.id for m in listing)] == [m.id for m in reader.list_messages()][:251]
    reader.close()
    store.close()


def test_readonly_open_without_access_says_so(tmp_path):
    """Red team 33b: a user who may not look into the queue directory was told there
    was no queue database."""
    if os.geteuid() != 0:
        pytest.skip("needs root to become another user")
    Store.open(tmp_path / "queue").close()
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # (a fork: the interpreter's files need not be within nobody's reach)
        os.close(read)
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            Store.open(tmp_path / "queue", readonly=True)
            os.write(write, b"opened")
        except QueueError as exc:
            os.write(write, str(exc).encode())
        finally:
            os._exit(0)
    os.close(write)
    said = os.read(read, 4096).decode()
    os.close(read)
    os.waitpid(child, 0)
    assert "permission denied: run as root or mail_owner" in said, said


def test_a_backup_is_not_written_where_another_user_may_replace_it(tmp_path):
    """Red team 33c: in a directory its owner (a user) may write, the user renamed a
    file of their own over the 0600 temporary just after root made it, and SQLite
    wrote the queue into the user's file.  Such a directory is refused."""
    from trimail.queue.backup import backup

    if os.geteuid() != 0:
        pytest.skip("needs root")
    Store.open(tmp_path / "queue").close()
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    with pytest.raises(QueueError, match="another user may replace files"):
        backup(tmp_path / "queue", theirs / "copy.db")
    assert list(theirs.iterdir()) == []
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # sticky, as /tmp: nobody else may rename root's file there
    backup(tmp_path / "queue", shared / "copy.db")
    assert (shared / "copy.db").exists()


def test_a_listing_pages_by_recipients_and_keeps_each_message_whole(tmp_path):
    """Red team 33c: pages of 1,000 messages held every recipient of each page at
    once (473 MB for 1,000 messages of 500 recipients, against 36 before).  Pages are
    recipients now; a message that spans pages is still listed once, whole."""
    store = Store.open(tmp_path / "queue")
    with store.transaction():
        for n in range(3):
            store.insert_message(message(recipients=[f"r{n}-{i}@example.com" for i in range(250)]))
    listed = list(store.iter_messages(page=100))
    whole = store.list_messages()
    assert [(m.id, [r.address for r in m.recipients]) for m in listed] == \
        [(m.id, [r.address for r in m.recipients]) for m in whole]
    assert [len(m.recipients) for m in listed] == [250, 250, 250]
    # red team 33d: a message removed while the listing went on was listed with part of its recipients
    reader = Store.open(tmp_path / "queue", readonly=True)
    listing = reader.iter_messages(page=100)
    first = next(listing)
    with store.transaction():
        store.db.execute("DELETE FROM message WHERE id = ?", (whole[1].id,))
    rest = list(listing)
    assert [first.id, *(m.id for m in rest)] == [whole[0].id, whole[2].id]
    assert [len(m.recipients) for m in (first, *rest)] == [250, 250]
    reader.close()
    plan = " ".join(str(row) for row in store.db.execute(
        "EXPLAIN QUERY PLAN SELECT r.seq FROM recipient AS r JOIN message AS m ON m.id = r.message_id"
        " WHERE r.message_id > '' ORDER BY r.message_id, r.seq LIMIT 10"))
    assert "TEMP B-TREE" not in plan, plan  # read in key order, not sorted whole first
    store.close()


def test_queue_ids_stay_sorted_when_the_count_wraps_within_a_microsecond(monkeypatch):
    """The 4 counting characters wrap after 51**4 IDs; when that fell within one
    microsecond, ...W0zzzz was followed by ...W00000 (a clean-clone run, session 37)."""
    import itertools

    from trimail.queue import ids

    monkeypatch.setattr(ids, "_counter", itertools.count(51**4 - 3))
    monkeypatch.setattr(ids.time, "time_ns", lambda: 1_800_000_000_000_000_000)  # the clock stands still
    made = [new_queue_id() for _ in range(6)]
    assert made == sorted(made) and len(set(made)) == 6
