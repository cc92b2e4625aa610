"""Red team 37: the log lines root's sendmail keeps in a message's params
(``cleanup.loglines.LOG_PARAM``) are data from the queue, written by serve's qmgr
inside its round; whatever the value holds, ``write_stored`` logs what is sound, one
warning for the rest, and never raises (a float level raised logging's
``TypeError: level must be an integer`` out of the qmgr's round: the qmgr worker
died, and serve did not start while such a message waited in maildrop)."""

from __future__ import annotations

import json
import logging

import pytest

from trimail.cleanup import loglines


@pytest.mark.parametrize("value", [
    '[["pickup", 20.0, "a float level"]]',
    '[["pickup", 20, "sound"], ["cleanup", 30.0, "a float level"]]',
    '[["pickup", true, "a boolean level"]]',
    '[["pickup", 1e400, "infinite"]]',
    '[["pickup", NaN, "nan"]]',
    '[["pickup", 20, "x", "four"]]',
    '"abc"',
    '{"pic": 1}',
    "[[[\"pickup\"], 20, \"unhashable program\"]]",
    "12",
    "null",
    "not json",
    json.dumps([["pickup", 20, "nul\x00and\nnewline"]]),
])
def test_a_stored_value_never_raises(value, caplog):
    caplog.set_level(logging.INFO, logger="trimail")
    loglines.write_stored("QID", value)
    for record in caplog.records:
        assert isinstance(record.levelno, int)
        assert "\n" not in record.getMessage() and "\x00" not in record.getMessage()


def test_sound_lines_are_written_and_a_float_level_is_reported(caplog):
    caplog.set_level(logging.INFO, logger="trimail")
    loglines.write_stored("QID", '[["pickup", 20, "QID: uid=0 from=<a@b.example>"], ["cleanup", 20.0, "x"]]')
    texts = [record.getMessage() for record in caplog.records]
    assert "QID: uid=0 from=<a@b.example>" in texts
    assert any("malformed maillog" in text for text in texts)
