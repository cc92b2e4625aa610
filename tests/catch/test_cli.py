"""``trimail catch``'s own options: ``-c`` and ``-o`` reach the capturing listener,
but never the parameters that decide where it listens, queues or sends mail."""

from __future__ import annotations

import os
import smtplib
import subprocess
import sys

import pytest

from tests.catch.conftest import message


def test_a_main_cf_given_with_c_sets_the_listeners_limits_but_not_its_queue(catch, tmp_path):
    main_cf = tmp_path / "main.cf"
    main_cf.write_text("message_size_limit = 2000\nqueue_directory = /nonexistent/queue\n"
                       "transport_maps = inline:{ example.com = smtp:[192.0.2.1] }\n")
    c = catch("-c", str(main_cf))
    with pytest.raises(smtplib.SMTPSenderRefused) as refused:
        c.send(message("big", text="x" * 5000))
    assert refused.value.smtp_code == 552
    c.send(message("small"))
    assert [m["Subject"] for m in c.wait_for(1)] == ["small"]


def test_o_sets_a_parameter(catch):
    c = catch("-o", "smtpd_recipient_limit=1")
    with smtplib.SMTP(c.host, c.smtp_port, timeout=30) as client:
        refused = client.sendmail("x@example.org", ["a@example.com", "b@example.com"], b"Subject: x\r\n\r\nx")
    assert refused["b@example.com"][0] == 452


@pytest.mark.parametrize("name", ["smtpd_listen", "queue_directory", "default_transport", "relayhost"])
def test_o_cannot_move_the_catcher_or_make_it_deliver(name):
    done = subprocess.run([sys.executable, "-m", "trimail", "catch", "-o", f"{name}=x", "--smtp", "127.0.44.254:0",
                           "--listen", "127.0.44.254:0"], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ), check=False)
    assert done.returncode == 1 and f"-o {name}: set by trimail catch itself" in done.stderr


def test_sigterm_stops_it_with_status_0(catch):
    c = catch()
    c.send(message("last"))
    c.wait_for(1)
    assert c.stop() == 0
    assert "trimail catch: stopped" in c.proc.stderr.read().decode()
