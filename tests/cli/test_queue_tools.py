"""The operator's queue tools against a live serve: hold, release, delete, requeue, flush;
and the Postfix-style delivery log lines."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from tests.conftest import trimail, write_main_cf
from tests.net.test_serve import smtplib_send_reply
from tests.peers import Sink


def listed(config_path) -> dict[str, dict]:
    result = trimail("queue", "list", "--json", "-c", str(config_path))
    assert result.returncode == 0, result.stderr
    return {m["id"]: m for m in json.loads(result.stdout)}


def test_hold_release_delete_and_requeue(tmp_path, serve_process):
    config_path = write_main_cf(tmp_path)  # qmgr disabled: mail stays where the tools put it
    proc = serve_process(config_path)
    ids = [smtplib_send_reply(proc.port, [f"r{i}@far.example"]).rsplit(" ", 1)[1] for i in range(3)]
    held = trimail("queue", "hold", ids[0], ids[1], "-c", str(config_path))
    assert held.returncode == 0 and "placed on hold: 2 messages" in held.stderr
    states = {i: m["state"] for i, m in listed(config_path).items()}
    assert states == {ids[0]: "hold", ids[1]: "hold", ids[2]: "incoming"}
    released = trimail("queue", "release", ids[0], "-c", str(config_path))
    assert released.returncode == 0 and listed(config_path)[ids[0]]["state"] == "incoming"
    deleted = trimail("queue", "delete", ids[1], "no-such-id", "-c", str(config_path))
    assert "deleted: 1 message" in deleted.stderr and "no-such-id" in deleted.stderr
    assert set(listed(config_path)) == {ids[0], ids[2]}
    requeued = trimail("queue", "requeue", "--all", "-c", str(config_path))
    assert requeued.returncode == 0 and "requeued: 2 messages" in requeued.stderr
    assert trimail("queue", "delete", "-c", str(config_path)).returncode == 1  # names nothing
    assert trimail("queue", "delete", "--all", "-c", str(config_path)).returncode == 0
    assert listed(config_path) == {}
    assert proc.stop() == 0


def test_delivery_log_lines_follow_postfix(tmp_path, serve_process):
    with Sink(rules={"bad": "550 5.1.1 no such user"}) as sink:
        config_path = write_main_cf(tmp_path, master_service_disable="",
                                    transport_maps=f"inline:{{ far.example=smtp:[127.0.0.1]:{sink.port} }}",
                                    relayhost="[127.0.0.1]:9")  # bounce to the sender: refused, deferred
        proc = serve_process(config_path)
        queue_id = smtplib_send_reply(proc.port, ["good@far.example", "bad@far.example"]).rsplit(" ", 1)[1]
        sent = proc.wait_log(rf"{queue_id}: to=<good@far.example>")
        bounced = proc.wait_log(rf"{queue_id}: to=<bad@far.example>")
        proc.wait_log(rf"{queue_id}: removed")
        proc.wait_log(rf"{queue_id}: sender non-delivery notification: ")
        relay = rf"relay=127\.0\.0\.1\[127\.0\.0\.1\]:{sink.port}"
        assert re.search(rf"trimail/smtp\[\d+\]: {queue_id}: to=<good@far.example>, {relay}, delay=[\d.]+, "
                         r"delays=[\d.]+/[\d.]+/[\d.]+/[\d.]+, dsn=2\.0\.0, status=sent \(250 ", sent), sent
        assert re.search(r"dsn=5\.1\.1, status=bounced \(host 127\.0\.0\.1\[127\.0\.0\.1\] said: "
                         r"550 5\.1\.1 no such user \(in reply to RCPT TO command\)\)", bounced), bounced
        assert proc.stop() == 0


def test_list_filters_and_summary(tmp_path, serve_process):
    config_path = write_main_cf(tmp_path)
    proc = serve_process(config_path)
    smtplib_send_reply(proc.port, ["a@one.example", "b@two.example"])
    held = smtplib_send_reply(proc.port, ["c@two.example"]).rsplit(" ", 1)[1]
    assert trimail("queue", "hold", held, "-c", str(config_path)).returncode == 0
    assert set(listed(config_path)) and len(json.loads(trimail(
        "queue", "list", "--json", "--domain", "two.example", "-c", str(config_path)).stdout)) == 2
    only_held = json.loads(trimail("queue", "list", "--json", "--state", "hold", "-c", str(config_path)).stdout)
    assert [m["id"] for m in only_held] == [held]
    assert json.loads(trimail("queue", "list", "--json", "--recipient", "A@one.example", "-c",
                              str(config_path)).stdout)[0]["recipients"][0]["address"] == "a@one.example"
    text = trimail("queue", "list", "-c", str(config_path)).stdout
    assert f"{held}!" in text and "-- 0 Kbytes in 2 Requests." in text
    summary = trimail("queue", "summary", "-c", str(config_path)).stdout.splitlines()
    assert any(line.split()[:3] == ["incoming", "one.example", "1"] for line in summary)
    assert any(line.split()[:3] == ["hold", "two.example", "1"] for line in summary)
    assert summary[-1].split() == ["TOTAL", "3"]
    assert proc.stop() == 0


def test_queue_list_is_a_table_on_a_terminal_and_plain_when_piped(tmp_path):
    import shutil
    import subprocess
    import sys

    import pytest

    if shutil.which("script") is None:
        pytest.skip("util-linux script(1) is needed to give the command a terminal")
    config_path = write_main_cf(tmp_path)
    submitted = subprocess.run([sys.executable, "-m", "trimail", "sendmail", "-c", str(config_path), "a@far.example"],
                               input=b"Subject: x\n\nbody\n", capture_output=True, timeout=60, check=False)
    assert submitted.returncode == 0
    queue_id = next(iter(listed(config_path)))
    piped = trimail("queue", "list", "-c", str(config_path)).stdout
    assert piped.startswith("----Queue ID----- --Size--") and "\x1b[" not in piped
    command = f"{sys.executable} -m trimail queue list -c {config_path}"
    on_tty = subprocess.run(["script", "-qec", command, "/dev/null"], capture_output=True, text=True,
                            timeout=60, check=False).stdout
    assert "Queue ID" in on_tty and queue_id in on_tty and "a@far.example" in on_tty and "\x1b[" in on_tty


def test_hold_leaves_a_message_in_maildrop_for_pickup(tmp_path):
    """postsuper -h takes no message from maildrop: held and released, one went to
    incoming and skipped pickup (its content_filter, a header_checks FILTER, the log
    lines root's sendmail kept for it: cleanup/loglines.py).  Red team 37."""
    config_path = write_main_cf(tmp_path, content_filter="smtp:[127.0.0.1]:10024")
    sent = subprocess.run([sys.executable, "-m", "trimail", "sendmail", "-C", str(config_path), "bob@remote.example"],
                          input=b"Subject: waits for pickup\n\nhi\n", capture_output=True, timeout=60, check=False)
    assert sent.returncode == 0, sent.stderr
    [queue_id] = listed(config_path)
    held = trimail("queue", "hold", queue_id, "-c", str(config_path))
    assert f"{queue_id}: no such message in a state that can be placed on hold" in held.stderr
    assert trimail("queue", "hold", "--all", "-c", str(config_path)).stderr.endswith("placed on hold: 0 messages\n")
    assert listed(config_path)[queue_id]["state"] == "maildrop"
