"""The lookups of one delivery attempt (``mx.Targets``): those before the first
connection can be made on their own (``prepare``: a delivery worker makes them
before it takes a slot), and failed address lookups are bounded in time
(``DNS_FAILURE_TIME_LIMIT``).  A scripted resolver under trio's MockClock."""

from __future__ import annotations

import trio

from trimail.delivery.mx import DNS_FAILURE_TIME_LIMIT, Targets
from trimail.net.dns import DnsTemporary, MailHost


class Resolver:
    """Answers *answers* (host -> addresses) at once; any other host fails after
    *silence* seconds (a name server that never answers: the resolver's lifetime)."""

    def __init__(self, answers: dict[str, list[str]], silence: float = 20.0) -> None:
        self.answers, self.silence = answers, silence
        self.asked: list[str] = []

    async def addresses(self, name: str) -> list[str]:
        self.asked.append(name)
        if name in self.answers:
            await trio.lowlevel.checkpoint()
            return self.answers[name]
        await trio.sleep(self.silence)
        raise DnsTemporary("4.4.3", f"Host or domain name not found. Name service error for name={name} "
                           "type=A: Host not found, try again")


def _targets(resolver: Resolver, hosts: list[MailHost], limit: int = 5) -> Targets:
    return Targets(resolver, "far.example", hosts, is_self=lambda address: False,  # type: ignore[arg-type]
                   address_limit=limit)


async def test_prepare_looks_up_the_best_group_with_addresses_and_no_further(autojump_clock):
    resolver = Resolver({"mx2.far.example": ["192.0.2.2"], "mx3.far.example": ["192.0.2.3"]})
    hosts = [MailHost("mx1.far.example", 10), MailHost("mx2.far.example", 20), MailHost("mx3.far.example", 30)]
    targets = _targets(resolver, hosts)
    await targets.prepare()
    assert resolver.asked == ["mx1.far.example", "mx2.far.example"]  # the silent best one, then the next group
    iterator = targets.__aiter__()
    first = await iterator.__anext__()
    assert (first.address, first.best) == ("192.0.2.2", False)
    assert resolver.asked == ["mx1.far.example", "mx2.far.example"]  # nothing looked up again
    assert [t.address async for t in iterator] == ["192.0.2.3"]  # the next group only when asked for


async def test_failed_address_lookups_of_one_attempt_stop_after_the_time_limit(autojump_clock):
    """100 MX hosts whose address lookups never answer (20 s each, A and AAAA) kept one
    attempt looking up for 2,000 s; it looks up no more once its failed lookups took
    DNS_FAILURE_TIME_LIMIT, and the attempt is deferred with the lookups' failure."""
    resolver = Resolver({"mx99.far.example": ["192.0.2.99"]}, silence=20.0)
    hosts = [MailHost(f"mx{i}.far.example", i) for i in range(100)]
    targets = _targets(resolver, hosts)
    started = trio.current_time()
    assert [t async for t in targets] == []
    took = trio.current_time() - started
    assert len(resolver.asked) == 2, len(resolver.asked)  # 20 s + 20 s: past the 30 s
    assert DNS_FAILURE_TIME_LIMIT <= took <= DNS_FAILURE_TIME_LIMIT + resolver.silence
    assert targets.failure is not None and targets.failure.status == "deferred" and targets.failure.dsn == "4.4.3"


async def test_lookups_that_answer_are_not_counted_against_the_limit(autojump_clock):
    """Only failed lookups count: a slow zone's answers (here 10 s each, past the
    limit together) still give their addresses."""

    class Slow(Resolver):
        async def addresses(self, name: str) -> list[str]:
            self.asked.append(name)
            await trio.sleep(10)
            return [f"192.0.2.{len(self.asked)}"]

    hosts = [MailHost(f"mx{i}.far.example", i) for i in range(5)]
    targets = _targets(Slow({}), hosts)
    assert [t.address async for t in targets] == [f"192.0.2.{i}" for i in range(1, 6)]
