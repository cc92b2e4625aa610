"""The lookups of one delivery attempt (``mx.Targets``): those before the first
connection can be made on their own (``prepare``: a delivery worker makes them
before it takes a slot).  A scripted resolver under trio's MockClock."""

from __future__ import annotations

import trio

from trimail.delivery.mx import Targets
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
