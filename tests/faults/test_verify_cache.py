"""A verification cache that cannot be used (a corrupt file, a file that cannot be
created) costs a temporary answer and a log line, never a session or a worker:
Postfix's verify(8) answers "Address verification status unavailable" when its
map fails.  A real serve with two smtpd workers; its internal server a counting
trio peer on 127.0.44.2."""

from __future__ import annotations

import re

from tests.faults.conftest import banner, smtpd_pids
from tests.faults.test_outbound import trio_thread
from tests.policy.test_verify import InternalServer
from tests.policy.test_verify_workers import HOST, UNKNOWN, rcpt, settings


def assert_serving(d) -> None:
    assert d.alive, "serve exited:\n" + "\n".join(d.proc.log[-30:])
    assert banner(d.port, HOST).startswith("220 ")


UNAVAILABLE = (f"4.1.1 <{UNKNOWN}>: Recipient address rejected: unverified address: "
               "Address verification status unavailable")


def test_a_corrupt_cache_gives_450_and_a_log_line_and_is_taken_again_once_removed(daemon):
    peer = InternalServer("127.0.44.2")
    with trio_thread((peer.run,)) as (port,):
        d = daemon(smtpd_workers=2, **settings(port))
        cache = d.queue_directory / "verify_cache.db"
        cache.write_bytes(b"\0garbage, not SQLite\n" * 200)
        pids = sorted(smtpd_pids(d))
        for _ in range(3):
            assert rcpt(d.port) == (450, UNAVAILABLE)
        d.proc.wait_log(rf"warning: address verification cache unavailable: {re.escape(str(cache))}: ")
        assert peer.connections == 0  # nothing probed that could not be remembered
        assert sorted(smtpd_pids(d)) == pids  # no worker died
        assert_serving(d)
        cache.unlink()  # the operator's fix (it is only a cache): no restart needed
        code, text = rcpt(d.port)
        assert code == 550 and "undeliverable address" in text
        assert peer.connections == 1


def test_a_cache_that_cannot_be_created_gives_450_not_a_dead_worker(daemon, tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the cache's directory should be\n")
    peer = InternalServer("127.0.44.2")
    with trio_thread((peer.run,)) as (port,):
        d = daemon(smtpd_workers=2, **settings(port, address_verify_map=f"btree:{blocker}/verify_cache"))
        pids = sorted(smtpd_pids(d))
        assert rcpt(d.port) == (450, UNAVAILABLE)
        d.proc.wait_log(rf"warning: address verification cache unavailable: {re.escape(str(blocker))}/verify_cache.db")
        assert sorted(smtpd_pids(d)) == pids
        assert peer.connections == 0
        assert_serving(d)
