"""The MIME converter and the SMTPUTF8 scan give the event loop back between slices
of their input: a 1 MiB content chunk of short 8-bit lines costs about half a second
of Python work, which held every session of serve still while it ran."""

from __future__ import annotations

import trio

from trimail.delivery.mime import content_needs_smtputf8, downgraded

CHUNK = b"Content-Transfer-Encoding: 8bit\r\nContent-Type: text/plain\r\n\r\n" + b"\xff\r\n" * (1 << 18)


async def content():
    yield CHUNK  # one queue chunk (the scheduler reads 1 MiB at a time)


async def ticks_while(work) -> int:
    """How often another task ran while *work* ran to its end."""
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await trio.lowlevel.checkpoint()
        await work()
        nursery.cancel_scope.cancel()
    return ticks


async def test_the_converter_yields_between_slices_of_a_chunk():
    out = []

    async def convert() -> None:
        async for piece in downgraded(content)():
            out.append(piece)

    assert await ticks_while(convert) >= 8  # 1 MiB in slices of at most 64 KiB (once before)
    assert b"".join(out).count(b"=FF\r\n") == 1 << 18


async def test_the_smtputf8_scan_yields_between_slices_of_a_chunk():
    async def scan() -> None:
        assert not await content_needs_smtputf8("a@x", ["b@y"], content)

    assert await ticks_while(scan) >= 8
