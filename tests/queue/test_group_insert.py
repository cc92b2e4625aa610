"""A group commit of new messages (the smtpd's accepted mail) inserts and commits
them with one statement (``Store.commit_messages``, ``queue.batch._insert_together``),
or with one statement per table in a transaction when there are more than one
statement takes (``Store.insert_messages``): the rows are those of inserting them
one by one, and one message that cannot be inserted still fails alone."""

from __future__ import annotations

import threading
import time

import apsw
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.queue.test_store import message
from trimail.queue.store import NewMessage, Store
from trimail.queue.writer import QueueWriter

TABLES = ("message", "recipient", "body", "queue_count")


def rows(store: Store) -> dict[str, list[tuple]]:
    return {table: sorted(store.db.execute(f"SELECT * FROM {table}").fetchall(), key=repr) for table in TABLES}


def messages_of(shapes: list[tuple[str, int, bytes, dict]]) -> list[NewMessage]:
    made = []
    for sender, recipients, content, params in shapes:
        if isinstance(recipients, int):
            recipients = [f"r{i}@example.com" for i in range(recipients)]
        msg = message(sender=sender, recipients=recipients, content=content)
        msg.params = params
        made.append(msg)
    return made


# recipients as any text SQLite takes (not a lone surrogate): they go through JSON
# on their way into commit_messages' statement
ADDRESS = st.text(st.characters(exclude_categories=("Cs",)), max_size=30)
SHAPES = st.lists(st.tuples(st.sampled_from(["", "a@example.org", "\u00e9@\u00e9xample.org"]),
                            st.integers(min_value=1, max_value=40) | st.lists(ADDRESS, max_size=5),
                            st.binary(max_size=300),
                            st.dictionaries(st.sampled_from(["BODY", "SMTPUTF8", "ENVID"]),
                                            st.none() | st.text(max_size=5), max_size=2)),
                  min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(shapes=SHAPES)
def test_messages_inserted_together_are_the_rows_of_messages_inserted_one_by_one(tmp_path_factory, shapes):
    together = Store.open(tmp_path_factory.mktemp("together"))
    committed = Store.open(tmp_path_factory.mktemp("committed"))
    one_by_one = Store.open(tmp_path_factory.mktemp("one-by-one"))
    made = messages_of(shapes)
    with together.transaction():
        together.insert_messages(made)
    committed.commit_messages(made)
    with one_by_one.transaction():
        for msg in made:
            one_by_one.insert_message(msg)
    assert rows(together) == rows(one_by_one)
    assert rows(committed) == rows(one_by_one)
    for store in (together, committed, one_by_one):
        store.close()


def test_one_statement_commits_the_messages_outside_any_transaction(tmp_path):
    """commit_messages is its own transaction: committed when it returns, seen by
    another connection, and the connection is not left inside a transaction."""
    store = Store.open(tmp_path)
    made = [message(recipients=["x@example.com", "y@example.com"]) for _ in range(3)]
    store.commit_messages(made)
    assert store.db.getautocommit()
    other = Store.open(tmp_path)
    assert sorted(info.id for info in other.list_messages()) == sorted(msg.id for msg in made)
    assert other.db.execute("SELECT count(*) FROM recipient").fetchall() == [(6,)]
    assert other.counts() == {"incoming": 3}
    store.commit_messages([message()])  # the view is made once per connection: a second commit
    assert other.counts() == {"incoming": 4}
    for opened in (store, other):
        opened.close()


def test_one_statement_that_fails_leaves_nothing(tmp_path):
    """One row of the statement breaks a constraint: none of its messages is queued."""
    store = Store.open(tmp_path)
    queued = message()
    store.commit_messages([queued])
    twin = message()
    twin.id = queued.id
    made = [message(), twin, message()]
    try:
        store.commit_messages(made)
    except apsw.ConstraintError:
        pass
    else:
        raise AssertionError("a duplicate ID was committed")
    assert store.db.getautocommit()
    assert [info.id for info in store.list_messages()] == [queued.id]
    assert store.db.execute("SELECT count(*) FROM recipient").fetchall() == [(1,)]
    store.close()


def test_one_statement_waits_for_the_write_lock_another_connection_holds(tmp_path):
    """Like BEGIN IMMEDIATE, the statement waits through the busy handler while
    another process's transaction holds SQLite's write lock, and then commits."""
    store = Store.open(tmp_path)
    holder = Store.open(tmp_path)
    holder.db.execute("BEGIN IMMEDIATE")
    released = threading.Event()

    def release() -> None:
        time.sleep(0.2)  # the lock held for a while: the statement must wait, not fail
        released.set()
        holder.db.execute("COMMIT")

    thread = threading.Thread(target=release)
    thread.start()
    made = [message(), message()]
    store.commit_messages(made)
    assert released.is_set()  # it returned only after the lock was given up
    thread.join()
    assert sorted(info.id for info in holder.list_messages()) == sorted(msg.id for msg in made)
    for opened in (store, holder):
        opened.close()


def test_more_rows_than_one_statement_takes_are_inserted_in_several(tmp_path):
    """More messages and recipients than ``_ROWS`` per statement: all of them."""
    made = [message(recipients=[f"r{i}@example.com" for i in range(300)]) for _ in range(3)]
    made += [message() for _ in range(600)]
    store = Store.open(tmp_path)
    with store.transaction():
        store.insert_messages(made)
    assert store.db.execute("SELECT count(*) FROM message").fetchall() == [(603,)]
    assert store.db.execute("SELECT count(*) FROM recipient").fetchall() == [(1500,)]
    assert store.counts() == {"incoming": 603}
    assert store.read_content(made[-1].id) == b"Subject: x\r\n\r\nbody\r\n"


async def _batch(tmp_path, made: list[NewMessage], before=None) -> tuple[list[object], list[str]]:
    """Run one insert request per message of *made* in a single group commit of a
    QueueWriter (its thread held until all of them wait), after *before* (a request
    run first); the answers (None or the error) and the SQL the batch ran."""
    holding, release = threading.Event(), threading.Event()
    statements: list[str] = []

    def hold(store: Store) -> None:
        if before is not None:
            before(store)
        store.db.exec_trace = lambda _cursor, sql, _bindings: statements.append(sql) or True
        holding.set()
        release.wait(10)

    answers: list[object] = [None] * len(made)

    async def insert(index: int, msg: NewMessage) -> None:
        try:
            await writer.run(Store.insert_message, msg)
        except Exception as exc:  # StorageError, or what a request raises as it is
            answers[index] = exc

    async with QueueWriter(lambda: Store.open(tmp_path)) as writer:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run, hold)
            assert await trio.to_thread.run_sync(holding.wait, 5)
            statements.clear()
            for index, msg in enumerate(made):
                nursery.start_soon(insert, index, msg)
            with trio.fail_after(5):
                while writer._requests.qsize() < len(made):
                    await trio.sleep(0.001)
            release.set()
        assert writer.stats.largest_batch == len(made)  # the requests did share one commit
    return answers, statements


def _after_hold(statements: list[str]) -> list[str]:
    """The statements of the batch: those after the holding request's COMMIT, but
    for the checkpoint as the writer stops."""
    return [sql for sql in statements[statements.index("COMMIT") + 1:] if not sql.startswith("PRAGMA wal_checkpoint")]


async def test_a_group_commit_of_new_messages_runs_one_statement(tmp_path):
    made = [message() for _ in range(5)]
    answers, statements = await _batch(tmp_path, made)
    assert answers == [None] * 5
    ran = [sql for sql in _after_hold(statements) if not sql.lstrip().startswith("CREATE TEMP")]
    assert len(ran) == 1 and ran[0].startswith("INSERT INTO temp.new_message"), statements
    store = Store.open(tmp_path)
    assert sorted(info.id for info in store.list_messages()) == sorted(msg.id for msg in made)


async def test_a_lone_new_message_is_committed_by_one_statement_too(tmp_path):
    made = [message()]
    answers, statements = await _batch(tmp_path, made)
    assert answers == [None]
    ran = [sql for sql in _after_hold(statements) if not sql.lstrip().startswith("CREATE TEMP")]
    assert len(ran) == 1 and ran[0].startswith("INSERT INTO temp.new_message"), statements


async def test_a_group_commit_of_more_messages_than_one_statement_takes_runs_one_insert_per_table(tmp_path):
    from trimail.queue.store import COMMIT_ROWS

    made = [message() for _ in range(COMMIT_ROWS + 1)]
    answers, statements = await _batch(tmp_path, made)
    assert answers == [None] * len(made)
    ran = _after_hold(statements)
    assert ran[0] == "BEGIN IMMEDIATE" and ran[-1] == "COMMIT", ran
    inserts = [sql for sql in ran if sql.startswith("INSERT")]
    assert len(inserts) == 6, ran  # each table twice: 256 rows a statement, and one more
    assert not any(sql.startswith("SAVEPOINT") for sql in ran)
    store = Store.open(tmp_path)
    assert len(store.list_messages()) == len(made)


async def test_a_message_that_cannot_be_inserted_fails_alone_in_its_group_commit(tmp_path):
    """One message of the batch has the ID of a message already queued: the batch is
    rolled back and run again request by request, each in a savepoint, so that one
    is answered with its error and the four others are committed."""
    made = [message() for _ in range(5)]
    clash = made[2]

    def queue_its_twin(store: Store) -> None:
        twin = message()
        twin.id = clash.id
        store.insert_message(twin)  # committed with the request that holds the thread

    answers, statements = await _batch(tmp_path, made, before=queue_its_twin)
    assert [index for index, answer in enumerate(answers) if answer is not None] == [2]
    assert "UNIQUE" in str(answers[2])
    assert any(sql.startswith("SAVEPOINT") for sql in statements)  # the request-by-request run
    store = Store.open(tmp_path)
    assert len(store.list_messages()) == 5  # the twin and the four others
    assert all(store.read_content(msg.id) == b"Subject: x\r\n\r\nbody\r\n" for msg in made)


async def test_a_message_that_cannot_be_bound_fails_alone_in_its_group_commit(tmp_path):
    """A value SQLite cannot take (a lone surrogate: not UTF-8) fails the multi-row
    statement before it runs; the batch runs again request by request and only that
    message gets the error."""
    made = [message() for _ in range(3)]
    made[1].sender = "\ud800@example.org"
    answers, _statements = await _batch(tmp_path, made)
    assert answers[0] is None and answers[2] is None
    assert isinstance(answers[1], UnicodeEncodeError)
    store = Store.open(tmp_path)
    assert sorted(info.id for info in store.list_messages()) == sorted([made[0].id, made[2].id])


async def test_a_group_commit_with_a_message_spilled_to_a_file_inserts_each_in_turn(tmp_path):
    big = message(content=b"x" * 200_000, spool_limit=64 * 1024, directory=tmp_path)
    assert not big.content.in_memory
    made = [message(), big, message()]
    answers, statements = await _batch(tmp_path / "q", made)
    assert answers == [None] * 3
    assert sum(sql.startswith("INSERT INTO message") for sql in statements) == 3
    store = Store.open(tmp_path / "q")
    assert store.read_content(big.id) == b"x" * 200_000
    assert len(store.list_messages()) == 3
