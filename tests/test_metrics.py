"""trimail.metrics: each metric is made on first use, yet the exposition shows every
one from the start, and two threads using a metric first make it once."""

from __future__ import annotations

import sys
import threading

from trimail.metrics import Metrics

NAMES = ("trimail_messages_received", "trimail_recipients_delivered", "trimail_recipients_deferred",
         "trimail_recipients_bounced", "trimail_smtpd_rejects", "trimail_smtpd_sessions",
         "trimail_queue_messages", "trimail_queue_oldest_message_age_seconds", "trimail_dead_destinations",
         "trimail_destination_connections", "trimail_delivery_duration_seconds", "trimail_queue_commit_seconds",
         "trimail_queue_commit_batch_size", "trimail_task_failures", "trimail_log_lines_dropped")


def test_a_fresh_exposition_lists_every_metric():
    text = Metrics().exposition().decode()
    for name in NAMES:
        assert f"# HELP {name}" in text, name
    assert "trimail_messages_received_total 0.0" in text


def test_a_metric_used_first_by_two_threads_at_once_is_made_once():
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads change hands between almost any two bytecodes
    try:
        race()
    finally:
        sys.setswitchinterval(switch)


def race() -> None:
    for _ in range(200):
        metrics = Metrics()
        barrier = threading.Barrier(4)
        errors: list[BaseException] = []

        def use() -> None:
            barrier.wait()
            try:
                metrics.commit(3, 0.001)
            except BaseException as exc:  # noqa: BLE001 - a duplicate registration would raise here
                errors.append(exc)

        threads = [threading.Thread(target=use) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert "trimail_queue_commit_batch_size_count 4.0" in metrics.exposition().decode()
