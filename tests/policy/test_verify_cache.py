"""The verification cache remembers what the probed server said, never our own
trouble: a temporary answer from the internal server is kept for
address_verify_negative_refresh_time (Postfix's verify(8) keeps DEFER results), but
a probe that failed here (its time limit, an internal error, a table failure) is not,
so a flood that makes probes wait cannot poison the cache for real users."""

from __future__ import annotations

import trio

from trimail.net.dns import Resolver
from trimail.policy.verify import Answer, Verifier


def verifier(make_config, script):
    v = Verifier(make_config(), Resolver([]))
    answers = iter(script)

    async def probe(address: str) -> Answer:
        v.probes += 1
        step = next(answers)
        if isinstance(step, Exception):
            raise step
        return step

    v.probe = probe
    return v


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
    await trio.lowlevel.checkpoint()


async def test_an_outsider_cannot_grow_the_cache_or_the_probe_table(make_config):
    """Guard (passed before): distinct addresses fill at most address_verify_cache_size
    entries (the oldest go first) and no finished probe stays in the running table."""
    v = verifier(make_config, [Answer("bounce", "550 unknown")] * 50)
    v.size = 10
    for n in range(50):
        assert (await v.query(f"u{n}@corp.example")).status == "bounce"
    assert len(v.cache) == 10 and not v.running
    assert "u49@corp.example" in v.cache and "u0@corp.example" not in v.cache
