"""Red team 37: a message whose params are not a JSON object (queue.db edited by
hand, a bad restore) never stops the queue manager's rounds.  Before, one such
message in maildrop failed every round (``SQLError: malformed JSON`` from the
promotion's json_type/json_set): no mail was claimed any more, from any queue; one
in incoming failed every claim (``json.loads``) the same way.  Now each goes to the
``corrupt`` state (kept for the operator, as a message whose content is short), with
a warning, and the round goes on."""

from __future__ import annotations

import time

import pytest

from tests.queue.test_transitions import new_message
from trimail.cleanup.loglines import LOG_PARAM
from trimail.queue.store import Store
from trimail.scheduler.qmgr import schedule_round


@pytest.mark.parametrize("state", ["maildrop", "incoming"])
@pytest.mark.parametrize("bad", ['{"maillog": [bad', "[1, 2]", "12", "", "null"])
def test_a_message_with_params_not_json_goes_to_corrupt_and_the_rest_is_claimed(tmp_path, state, bad, caplog):
    store = Store.open(tmp_path)
    with store.transaction():
        for n in range(3):
            message = new_message(n)
            message.state = state
            message.params = {LOG_PARAM: f'[["pickup", 20, "N00000000{n}: uid=0 from=<a@b.example>"]]'}
            store.insert_message(message)
        store.db.execute("UPDATE message SET params = ? WHERE id = 'N000000001'", (bad,))
    picked: list[tuple[str, str]] = []
    for _ in range(2):  # the second round: nothing left to trip over
        with store.transaction():
            claimed, _due = schedule_round(store, time.time(), 64, picked=picked)
        if claimed:
            assert sorted(m.id for m in claimed) == ["N000000000", "N000000002"]
    states = dict(store.db.execute("SELECT id, state FROM message"))
    assert states == {"N000000000": "active", "N000000001": "corrupt", "N000000002": "active"}
    assert any("N000000001" in r.getMessage() and "corrupt" in r.getMessage() for r in caplog.records)
    if state == "maildrop":
        assert sorted(queue_id for queue_id, _ in picked) == ["N000000000", "N000000002"]
