"""non_smtpd_milters: mail from ``trimail sendmail`` (a real process) goes through
the filters before it is committed: OpenDKIM signs it, a refusal is sendmail's
error and nothing is queued, a quarantine holds it."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import dkim
import trio

from tests.conftest import write_main_cf
from tests.milter.peers import FakeMilter, OpenDkim, reply
from trimail.milter import protocol as p
from trimail.queue import transitions
from trimail.queue.store import Store

LETTER = b"From: alice@example.com\nTo: bob@remote.example\nSubject: local\n\nfrom sendmail\n"


def config(tmp_path: Path, **params) -> Path:
    settings = {"smtpd_listen": "127.0.45.1:0", "myorigin": "example.com", "alias_maps": "", "alias_database": ""}
    return write_main_cf(tmp_path, **{**settings, **params})


async def sendmail(config_path: Path, *args: str, data: bytes = LETTER) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    return await trio.run_process([sys.executable, "-m", "trimail", "sendmail", "-c", str(config_path), *args],
                                  stdin=data, capture_stdout=True, capture_stderr=True, check=False, env=env)


def queued(config_path: Path) -> list[tuple[dict, bytes]]:
    if not (config_path.parent / "queue" / "queue.db").exists():  # nothing was ever queued
        return []
    out = subprocess.run([sys.executable, "-m", "trimail", "queue", "list", "--json", "-c", str(config_path)],
                         capture_output=True, check=True, text=True).stdout
    store = Store.open(config_path.parent / "queue", readonly=True)
    try:
        return [(m, store.read_content(m["id"])) for m in json.loads(out)]
    finally:
        store.close()


async def test_opendkim_signs_locally_submitted_mail(tmp_path):
    signer = OpenDkim(tmp_path / "opendkim")
    try:
        path = config(tmp_path, non_smtpd_milters=signer.name)
        result = await sendmail(path, "-f", "alice@example.com", "bob@remote.example")
    finally:
        signer.close()
    assert result.returncode == 0, result.stderr
    [(message, content)] = queued(path)
    assert message["state"] == "maildrop"
    assert content.startswith(b"DKIM-Signature:")
    assert dkim.verify(content, dnsfunc=signer.dnsfunc)


async def test_a_refusal_is_sendmails_error_and_nothing_is_queued(tmp_path, nursery):
    milter = await nursery.start(FakeMilter(
        lambda c, d, m: [reply(p.SMFIR_REPLYCODE, b"550 5.7.1 Not from here\0")] if c == p.SMFIC_BODYEOB
        else None).run)
    path = config(tmp_path, non_smtpd_milters=milter.name)
    result = await sendmail(path, "bob@remote.example")
    assert result.returncode == 69
    assert b"550 5.7.1 Not from here" in result.stderr
    assert queued(path) == []
    macros = milter.macros()
    assert macros["_"] == "localhost [127.0.0.1]" and macros["{rcpt_addr}"] == "bob@remote.example"


async def test_quarantine_holds_and_edits_are_made(tmp_path, nursery):
    eom = [reply(p.SMFIR_ADDRCPT, b"<archive@remote.example>\0"),
           reply(p.SMFIR_CHGHEADER, struct.pack(">I", 1) + b"Subject\0filtered\0"),
           reply(p.SMFIR_QUARANTINE, b"check me\0"), reply(p.SMFIR_CONTINUE)]
    milter = await nursery.start(FakeMilter(lambda c, d, m: eom if c == p.SMFIC_BODYEOB else None).run)
    path = config(tmp_path, non_smtpd_milters=milter.name)
    result = await sendmail(path, "bob@remote.example")
    assert result.returncode == 0, result.stderr
    [(message, content)] = queued(path)
    assert message["state"] == "maildrop"  # held once serve's pickup takes it, as cleanup holds it after pickup
    store = Store.open(path.parent / "queue")
    try:
        with store.transaction():
            logs: list[tuple[str, str]] = []
            transitions.promote_maildrop(store, logs=logs)
    finally:
        store.close()
    # the milter's line, kept for serve to write with pickup's (cleanup/loglines.py)
    [(_, kept)] = logs
    assert ["cleanup", 20, f"{message['id']}: milter-hold: END-OF-MESSAGE from localhost[127.0.0.1]: check me; "
            "from=<root@example.com>"] in json.loads(kept)
    [(message, content)] = queued(path)
    assert message["state"] == "hold"
    assert sorted(r["address"] for r in message["recipients"]) == ["archive@remote.example", "bob@remote.example"]
    assert b"\r\nSubject: filtered\r\n" in content


async def test_a_filter_that_is_down_tempfails_sendmail(tmp_path):
    path = config(tmp_path, non_smtpd_milters="inet:127.0.45.4:9")
    result = await sendmail(path, "bob@remote.example")
    assert result.returncode == 75
    assert b"451 4.7.1 Service unavailable - try again later" in result.stderr


async def test_sendmail_bs_mail_goes_through_the_filters_with_the_clients_helo(tmp_path, nursery):
    eom = [reply(p.SMFIR_ADDHEADER, b"X-Filtered\0bs\0"), reply(p.SMFIR_CONTINUE)]
    milter = await nursery.start(FakeMilter(lambda c, d, m: eom if c == p.SMFIC_BODYEOB else None).run)
    path = config(tmp_path, non_smtpd_milters=milter.name)
    session = (b"EHLO me.example\r\nMAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@remote.example>\r\nDATA\r\n"
               b"Subject: bs\r\n\r\nhello\r\n.\r\nQUIT\r\n")
    result = await sendmail(path, "-bs", data=session)
    assert result.returncode == 0, result.stderr
    [(_, content)] = queued(path)
    assert b"\r\nX-Filtered: bs\r\n" in content
    assert milter.got(p.SMFIC_HELO) == [b"me.example\0"]


async def test_a_header_checks_pass_keeps_local_mail_from_the_milters(tmp_path, nursery):
    # header_checks(5) PASS turns off Milter inspection of the message too; the control
    # (no PASS) is refused by the same milter
    milter = await nursery.start(FakeMilter(
        lambda c, d, m: [reply(p.SMFIR_REPLYCODE, b"550 5.7.1 Not from here\0")] if c == p.SMFIC_BODYEOB
        else None).run)
    (tmp_path / "hc").write_text("/^Subject: local$/ PASS\n")
    path = config(tmp_path, non_smtpd_milters=milter.name, header_checks=f"regexp:{tmp_path / 'hc'}")
    result = await sendmail(path, "bob@remote.example")
    assert result.returncode == 0, result.stderr
    assert [message["state"] for message, _ in queued(path)] == ["maildrop"]
    assert milter.got(p.SMFIC_BODYEOB) == []
    control = await sendmail(path, "bob@remote.example", data=LETTER.replace(b"Subject: local", b"Subject: other"))
    assert control.returncode == 69
