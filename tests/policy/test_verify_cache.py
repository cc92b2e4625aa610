"""The verification cache (trimail/queue/verifycache.py) as the Verifier uses it,
with a scripted probe and a real SQLite file: what the probed server said is
remembered with Postfix's verify(8) expiry and refresh rules; our own trouble
never is, so a flood that makes probes wait cannot poison the cache for real
users; two Verifiers on one file (two smtpd workers) probe an address once."""

from __future__ import annotations

import os
import time
from pathlib import Path

import trio

from trimail.net.dns import Resolver
from trimail.policy.verify import IN_PROGRESS, UNAVAILABLE, Answer, Verifier
from trimail.policy.verifycleanup import clean_cache
from trimail.queue.verifycache import VerifyCache, cache_file


def verifier(make_config, script, **params):
    params.setdefault("address_verify_poll_delay", "1s")
    config = make_config(**params)
    os.makedirs(os.path.dirname(cache_file(config.address_verify_map)), exist_ok=True)
    v = Verifier(config, Resolver([]))
    answers = iter(script)

    async def probe(address: str) -> Answer:
        v.probes += 1
        step = next(answers)
        if isinstance(step, trio.Event):
            await step.wait()
            step = next(answers)
        if isinstance(step, Exception):
            raise step
        return step

    v.probe = probe
    return v


async def settled(v: Verifier) -> None:
    """Background probes (refreshes) have finished."""
    with trio.fail_after(5):
        while v.running:
            await trio.sleep(0.005)


def backdate(v: Verifier, address: str, status: str, text: str, age: float) -> None:
    """An entry written *age* seconds ago (as an earlier run would have left it)."""
    VerifyCache(v.store.path).record(address, status, text, time.time() - age, keep_ok_until=0,
                                     keep_failures=True, size=1000)


async def test_a_local_failure_is_not_remembered(make_config):
    v = verifier(make_config, [RuntimeError("boom"), Answer("ok", "250")])
    assert (await v.query("a@corp.example")).status == "defer"
    assert (await v.query("a@corp.example")).status == "ok"  # probed again
    assert v.probes == 2


async def test_a_table_failure_is_not_remembered(make_config):
    v = verifier(make_config, [Answer("defer", "mail transport unavailable: x", local=True), Answer("ok", "250")])
    assert (await v.query("a@corp.example")).status == "defer"
    assert (await v.query("a@corp.example")).status == "ok"
    assert v.probes == 2


async def test_the_servers_temporary_answer_is_remembered(make_config):
    v = verifier(make_config, [Answer("defer", "450 try later"), Answer("ok", "250")])
    assert (await v.query("a@corp.example")).why == "450 try later"
    assert (await v.query("a@corp.example")).why == "450 try later"
    assert v.probes == 1


async def test_an_outsider_cannot_grow_the_cache_or_the_probe_table(make_config):
    """Distinct addresses fill at most address_verify_cache_size entries (the oldest
    go first) and no finished probe stays in the running table."""
    v = verifier(make_config, [Answer("bounce", "550 unknown")] * 50, address_verify_cache_size="10")
    for n in range(50):
        assert (await v.query(f"u{n}@corp.example")).status == "bounce"
    assert not v.running
    db = VerifyCache(v.store.path)
    assert db.lookup("u49@corp.example") is not None and db.lookup("u0@corp.example") is None
    assert db._run(lambda c: c.execute("SELECT count(*) FROM verify").fetchone()[0]) == 10


async def test_two_workers_on_one_cache_probe_once(make_config):
    """A second Verifier on the same file (another smtpd worker) takes the first's
    answer from the cache, and while the first's probe runs it answers 'in progress'
    without probing (the probe's mark in the cache)."""
    gate = trio.Event()
    first = verifier(make_config, [gate, Answer("bounce", "550 unknown")])
    second = verifier(make_config, [])  # would fail (StopIteration) if it probed
    first.wait = 0  # answers 'in progress' at once, the probe goes on
    assert (await first.query("a@corp.example")).why == IN_PROGRESS
    assert (await second.query("a@corp.example")).why == IN_PROGRESS
    gate.set()
    await settled(first)
    assert (await second.query("a@corp.example")) == Answer("bounce", "550 unknown")
    assert first.probes == 1 and second.probes == 0


async def test_a_stale_answer_is_used_while_it_is_probed_again(make_config):
    v = verifier(make_config, [Answer("ok", "250 new")])
    backdate(v, "a@corp.example", "ok", "250 old", age=8 * 86400)  # past the 7d refresh, before the 31d expiry
    assert (await v.query("a@corp.example")) == Answer("ok", "250 old")
    await settled(v)
    assert v.probes == 1
    assert (await v.query("a@corp.example")) == Answer("ok", "250 new")
    assert v.probes == 1  # fresh now


async def test_a_failed_refresh_does_not_replace_a_deliverable_answer(make_config):
    v = verifier(make_config, [Answer("bounce", "550 unknown")])
    backdate(v, "a@corp.example", "ok", "250 old", age=8 * 86400)
    assert (await v.query("a@corp.example")).status == "ok"
    await settled(v)
    assert (await v.query("a@corp.example")) == Answer("ok", "250 old")  # optimistic caching
    assert v.probes == 1  # and not probed again before the probe's mark lapses


async def test_an_expired_answer_is_not_used(make_config):
    v = verifier(make_config, [Answer("ok", "250")])
    backdate(v, "a@corp.example", "bounce", "550 old", age=4 * 86400)  # past the 3d negative expiry
    assert (await v.query("a@corp.example")) == Answer("ok", "250")
    assert v.probes == 1


async def test_without_negative_cache_failures_are_not_kept(make_config):
    v = verifier(make_config, [Answer("bounce", "550 unknown")] * 2, address_verify_negative_cache="no")
    assert (await v.query("a@corp.example")).status == "bounce"
    assert VerifyCache(v.store.path).lookup("a@corp.example") is None
    assert (await v.query("a@corp.example")).status == "bounce"
    assert v.probes == 2


async def test_cleanup_drops_expired_entries_and_keeps_the_rest(make_config, nursery):
    v = verifier(make_config, [], address_verify_cache_cleanup_interval="1h")
    backdate(v, "old@corp.example", "bounce", "550", age=4 * 86400)
    backdate(v, "new@corp.example", "bounce", "550", age=60)
    nursery.start_soon(clean_cache, lambda: v.config)  # the first run is due at once
    db = VerifyCache(v.store.path)
    with trio.fail_after(5):
        while db.lookup("old@corp.example") is not None:
            await trio.sleep(0.01)
    assert db.lookup("new@corp.example") is not None
    assert 3500 < db.cleanup_due(time.time(), 3600) <= 3600  # the next run, an interval later


async def test_a_corrupt_cache_answers_unavailable_and_recovers_when_removed(make_config, caplog):
    v = verifier(make_config, [Answer("ok", "250")])
    Path(v.store.path).write_bytes(b"this is not a database" * 100)
    assert (await v.query("a@corp.example")) == Answer("defer", UNAVAILABLE, local=True)
    assert "address verification cache unavailable" in caplog.text and str(v.store.path) in caplog.text
    os.unlink(v.store.path)  # the operator's fix: it is only a cache
    assert (await v.query("a@corp.example")) == Answer("ok", "250")
