"""One address-verification cache for a whole ``trimail serve`` (Postfix's one
verify(8) with its persistent address_verify_map): a real serve child process with
two smtpd workers (and with ``smtpd_workers = 0``), its internal server a trio peer
that counts the probes.  A probe made through one worker answers the other worker
from the cache; the answer survives a restart of serve; an expired answer is
probed again; the qmgr worker's cleanup removes expired entries."""

from __future__ import annotations

import re
import smtplib

import pytest

from tests.conftest import write_main_cf
from tests.faults.conftest import wait_until
from tests.faults.test_outbound import trio_thread
from tests.policy.test_verify import InternalServer

HOST = "127.0.44.1"  # serve listens here; the internal server on 127.0.44.2
UNKNOWN = "nobody@remote.example"


def settings(peer_port: int, **extra: object) -> dict[str, object]:
    return {"smtpd_listen": f"{HOST}:0", "master_service_disable": "", "relay_domains": "remote.example",
            "relayhost": f"[127.0.44.2]:{peer_port}", "smtpd_recipient_restrictions": "reject_unverified_recipient",
            "unverified_recipient_reject_code": "550", "address_verify_poll_delay": "1s", **extra}


def rcpt(port: int, recipient: str = UNKNOWN) -> tuple[int, str]:
    with smtplib.SMTP(HOST, port, timeout=30) as client:
        client.ehlo("client.example")
        client.docmd("MAIL", "FROM:<a@client.example>")
        code, text = client.docmd("RCPT", f"TO:<{recipient}>")
    return code, text.decode()


def rejecting_pids(proc) -> set[str]:
    """The processes that logged a reject for RCPT (smtpd workers, or serve itself)."""
    return set(re.findall(r"trimail/smtpd\[(\d+)\]: NOQUEUE: reject: RCPT", "\n".join(proc.log)))


@pytest.mark.parametrize("workers", [2, 0])
def test_one_probe_answers_every_worker_and_survives_a_restart(tmp_path, serve_process, workers):
    peer = InternalServer("127.0.44.2")
    with trio_thread((peer.run,)) as (port,):
        config = write_main_cf(tmp_path, smtpd_workers=workers, **settings(port))
        proc = serve_process(config)
        code, text = rcpt(proc.port)
        assert code == 550 and "undeliverable address" in text, text
        assert peer.rcpts == [UNKNOWN]
        held: list[smtplib.SMTP] = []
        try:  # sessions held open: the least busy worker takes the next, until the other one answered
            for _ in range(8):
                wait_until(lambda: len(re.findall(r"NOQUEUE: reject: RCPT", "\n".join(proc.log))) == len(held) + 1)
                if len(rejecting_pids(proc)) == (2 if workers else 1):
                    break
                client = smtplib.SMTP(HOST, proc.port, timeout=30)
                held.append(client)
                client.ehlo("client.example")
                client.docmd("MAIL", "FROM:<a@client.example>")
                code, text = client.docmd("RCPT", f"TO:<{UNKNOWN}>")
                assert code == 550 and b"undeliverable address" in text
            assert len(rejecting_pids(proc)) == (2 if workers else 1), proc.log
        finally:
            for client in held:
                client.close()
        assert peer.connections == 1 and peer.rcpts == [UNKNOWN]  # every other answer came from the cache

        assert proc.stop() == 0
        again = serve_process(config)
        code, text = rcpt(again.port)
        assert code == 550 and "undeliverable address" in text
        assert peer.connections == 1  # remembered across the restart
        assert (tmp_path / "queue" / "verify_cache.db").exists()


def test_an_expired_answer_is_probed_again_and_cleaned_up(tmp_path, serve_process):
    peer = InternalServer("127.0.44.2")
    with trio_thread((peer.run,)) as (port,):
        config = write_main_cf(tmp_path, smtpd_workers=2, **settings(
            port, address_verify_negative_expire_time="1s", address_verify_negative_refresh_time="1s",
            address_verify_cache_cleanup_interval="1s"))
        proc = serve_process(config)
        assert rcpt(proc.port)[0] == 550
        assert peer.rcpts == [UNKNOWN]
        # the qmgr worker's cleanup (due at once, then every second) drops the expired entry
        line = proc.wait_log(r"trimail/verify\[\d+\]: cache btree:\S+ full cleanup: retained=0 dropped=1 entries")
        qmgr = re.search(r"trimail/qmgr\[(\d+)\]", "\n".join(proc.log)).group(1)
        assert f"trimail/verify[{qmgr}]" in line  # in the qmgr worker, not in every smtpd worker
        wait_until(lambda: rcpt(proc.port)[0] == 550 and len(peer.rcpts) == 2, timeout=15)
        assert peer.rcpts == [UNKNOWN, UNKNOWN]  # probed again once expired, not before
