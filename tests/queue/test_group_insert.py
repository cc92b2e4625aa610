"""A group commit of new messages (the smtpd's accepted mail) inserts them with one
statement per table (``Store.insert_messages``, ``queue.batch._insert_together``):
the rows are those of inserting them one by one, and one message that cannot be
inserted still fails alone."""

from __future__ import annotations

import threading

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
        msg = message(sender=sender, recipients=[f"r{i}@example.com" for i in range(recipients)], content=content)
        msg.params = params
        made.append(msg)
    return made


SHAPES = st.lists(st.tuples(st.sampled_from(["", "a@example.org", "\u00e9@\u00e9xample.org"]),
                            st.integers(min_value=1, max_value=40),
                            st.binary(max_size=300),
                            st.dictionaries(st.sampled_from(["BODY", "SMTPUTF8", "ENVID"]),
                                            st.none() | st.text(max_size=5), max_size=2)),
                  min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(shapes=SHAPES)
def test_messages_inserted_together_are_the_rows_of_messages_inserted_one_by_one(tmp_path_factory, shapes):
    together = Store.open(tmp_path_factory.mktemp("together"))
    one_by_one = Store.open(tmp_path_factory.mktemp("one-by-one"))
    made = messages_of(shapes)
    with together.transaction():
        together.insert_messages(made)
    with one_by_one.transaction():
        for msg in made:
            one_by_one.insert_message(msg)
    assert rows(together) == rows(one_by_one)
    together.close()
    one_by_one.close()


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


async def test_a_group_commit_of_new_messages_runs_one_insert_per_table(tmp_path):
    made = [message() for _ in range(5)]
    answers, statements = await _batch(tmp_path, made)
    assert answers == [None] * 5
    inserts = [sql for sql in statements if sql.startswith("INSERT")]
    assert len(inserts) == 3, statements  # message, body, recipient: not 3 per message
    assert not any(sql.startswith("SAVEPOINT") for sql in statements)
    store = Store.open(tmp_path)
    assert sorted(info.id for info in store.list_messages()) == sorted(msg.id for msg in made)


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
