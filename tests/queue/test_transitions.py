"""The queue manager's SQL: claims are small, indexed, and take new mail and due
retries in turn."""

from __future__ import annotations

import json
import time

from tests.scheduler.storm import queue_due_retries
from trimail.queue import transitions
from trimail.queue.spool import Spool
from trimail.queue.store import NewMessage, Store
from trimail.scheduler.qmgr import schedule_round


def new_message(n: int) -> NewMessage:
    spool = Spool()
    spool.write(f"Subject: new {n}\r\n\r\nnew {n}\r\n".encode())
    return NewMessage(f"N{n:09d}", "new@client.example", [f"n{n}@new.example"], spool)


DUE = f"{transitions._CLAIM_COLUMNS} WHERE state = 'deferred' AND next_attempt <= ? ORDER BY next_attempt LIMIT ?"


def plans(store: Store, sql: str, *args: object) -> list[str]:
    return [row[3] for row in store.db.execute(f"EXPLAIN QUERY PLAN {sql}", args)]


def test_claiming_uses_indexes_and_never_sorts_the_queue(tmp_path):
    store = Store.open(tmp_path)
    for sql, args in [
        (f"{transitions._CLAIM_COLUMNS} WHERE state = 'incoming' ORDER BY id LIMIT ?", (10,)),
        (DUE, (time.time(), 10)),
        ("SELECT min(next_attempt) FROM message WHERE state = 'deferred'", ()),
        ("SELECT rowid FROM message WHERE state = 'maildrop' LIMIT ?", (10,)),
    ]:
        plan = plans(store, sql, *args)
        assert not any("TEMP B-TREE" in step for step in plan), (sql, plan)
        assert not any(step.startswith("SCAN message") and "INDEX" not in step for step in plan), (sql, plan)


def test_a_round_claims_a_small_batch_however_much_is_due(tmp_path):
    queue_due_retries(tmp_path, 1000)
    store = Store.open(tmp_path)
    now = time.time()
    with store.transaction():
        claimed, due = schedule_round(store, now, 20_000)
    assert len(claimed) == transitions.CLAIM_BATCH
    assert due is not None and due <= now  # more retries are due: the round goes on
    counts = store.counts()
    assert counts == {"active": transitions.CLAIM_BATCH, "deferred": 1000 - transitions.CLAIM_BATCH}


def test_claims_take_new_mail_and_due_retries_in_turn(tmp_path):
    queue_due_retries(tmp_path, 500)
    store = Store.open(tmp_path)
    with store.transaction():
        for n in range(20):
            store.insert_message(new_message(n))
    with store.transaction():
        claimed = transitions.claim(store, 30, time.time())
    kinds = ["retry" if m.retry else "new" for m in claimed]
    assert kinds[:30] == ["new", "retry"] * 15
    with store.transaction():
        claimed = transitions.claim(store, 30, time.time())
    assert [m.retry for m in claimed] == [False, True] * 5 + [True] * 20  # the rest of the new mail, in turn
    assert [m.id for m in claimed if not m.retry] == [f"N{n:09d}" for n in range(15, 20)]  # oldest first


def test_retries_that_are_not_due_stay_deferred(tmp_path):
    queue_due_retries(tmp_path, 10)
    store = Store.open(tmp_path)
    with store.transaction():
        store.db.execute("UPDATE message SET next_attempt = ? WHERE id >= 'R000000005'", (time.time() + 3600,))
        claimed = transitions.claim(store, 100, time.time())
    assert sorted(m.id for m in claimed) == [f"R{n:09d}" for n in range(5)]
    assert store.counts() == {"active": 5, "deferred": 5}


def test_maildrop_is_promoted_in_bounded_batches(tmp_path):
    store = Store.open(tmp_path)
    with store.transaction():
        for n in range(transitions.PROMOTE_BATCH + 10):
            message = new_message(n)
            message.state = "maildrop"
            store.insert_message(message)
        assert transitions.promote_maildrop(store) == transitions.PROMOTE_BATCH
        assert transitions.promote_maildrop(store) == 10


def test_pickup_puts_its_content_filter_unless_the_checks_gave_a_filter(tmp_path):
    """Postfix's cleanup writes a header_checks FILTER after pickup's content_filter:
    the promotion stores pickup's, or the checks' in its place (cleanup/inspection.py)."""
    from trimail.delivery.route import CHECKS_FILTER_PARAM, FILTER_PARAM

    store = Store.open(tmp_path)
    with store.transaction():
        for n, params in enumerate([{}, {CHECKS_FILTER_PARAM: "smtp:[127.0.0.9]:10026"}, {FILTER_PARAM: "old:x"}]):
            message = new_message(n)
            message.state, message.params = "maildrop", params
            store.insert_message(message)
        assert transitions.promote_maildrop(store, param=(FILTER_PARAM, "smtp:[127.0.0.1]:10024"),
                                            override=CHECKS_FILTER_PARAM) == 3
    params = {mid: json.loads(text) for mid, text in store.db.execute("SELECT id, params FROM message")}
    assert params == {"N000000000": {FILTER_PARAM: "smtp:[127.0.0.1]:10024"},
                      "N000000001": {FILTER_PARAM: "smtp:[127.0.0.9]:10026"},
                      "N000000002": {FILTER_PARAM: "smtp:[127.0.0.1]:10024"}}
    with store.transaction():
        message = new_message(3)
        message.state, message.params = "maildrop", {CHECKS_FILTER_PARAM: "smtp:[127.0.0.9]:10026"}
        store.insert_message(message)
        transitions.promote_maildrop(store, param=(FILTER_PARAM, ""), override=CHECKS_FILTER_PARAM)
    [(text,)] = store.db.execute("SELECT params FROM message WHERE id = 'N000000003'").fetchall()
    assert json.loads(text) == {FILTER_PARAM: "smtp:[127.0.0.9]:10026"}  # no content_filter: the checks' still


def test_pickup_takes_the_log_lines_a_message_kept_and_holds_one_that_asked(tmp_path):
    """Root's sendmail keeps pickup's and cleanup's log lines with the message, and a
    message the checks held waits in maildrop for serve (cleanup/loglines.py): the
    promotion hands the lines over once, and moves that message to hold."""
    from trimail.cleanup.loglines import LOG_PARAM
    from trimail.delivery.route import FILTER_PARAM

    store = Store.open(tmp_path)
    logs: list[tuple[str, str]] = []
    with store.transaction():
        for n, params in enumerate([{}, {LOG_PARAM: '[["pickup", 20, "N000000001: uid=0 from=<a@b>"]]'},
                                    {LOG_PARAM: "[]", transitions.PICKUP_HOLD_PARAM: None, "RET": "HDRS"}]):
            message = new_message(n)
            message.state, message.params = "maildrop", params
            store.insert_message(message)
        assert transitions.promote_maildrop(store, param=(FILTER_PARAM, ""), logs=logs) == 3
    assert logs == [("N000000001", '[["pickup", 20, "N000000001: uid=0 from=<a@b>"]]'), ("N000000002", "[]")]
    rows = {mid: (state, json.loads(text)) for mid, state, text in store.db.execute("SELECT id, state, params FROM message")}
    assert rows == {"N000000000": ("incoming", {}), "N000000001": ("incoming", {}), "N000000002": ("hold", {"RET": "HDRS"})}
    logs.clear()
    with store.transaction():
        message = new_message(3)
        message.state, message.params = "maildrop", {LOG_PARAM: "[]", transitions.PICKUP_HOLD_PARAM: None}
        store.insert_message(message)
        assert transitions.promote_maildrop(store) == 1  # the qmgr's way without a content_filter param
    [(state, text)] = store.db.execute("SELECT state, params FROM message WHERE id = 'N000000003'").fetchall()
    assert (state, json.loads(text)) == ("hold", {LOG_PARAM: "[]"})  # lines taken only when asked for
