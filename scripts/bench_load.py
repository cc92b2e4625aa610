"""The load of ``scripts/bench``: messages sent in one of two connection modes.

- ``reuse``: each session sends its share of the messages over one connection
  (``smtp-source -d``; smtp-source(1): "-d  Don't disconnect after sending a
  message; send the next message over the same connection").  What a busy
  internal client or another MTA with a connection cache does.
- ``no`` reuse: every message on a connection of its own: connect, banner,
  HELO, one transaction, QUIT (``smtp-source`` without ``-d``, its default).
  What a gateway mostly sees from the Internet: many clients, one or two
  messages each.

The built-in client (used when smtp-source is not installed) does the same in
both modes; ``measure_latency`` times one transaction at a time in either.
"""

from __future__ import annotations

import subprocess
import time

REUSE_MODES = ("yes", "no")
REUSE_LABELS = {"yes": "reuse (-d)", "no": "one per message"}
SENDER, RECIPIENT = "bench@client.example", "sink@dest.example"


def smtp_source_command(address: str, port: int, messages: int, sessions: int, size: int,
                        reuse: str) -> list[str]:
    """smtp-source's command line: ``-d`` only when connections are reused."""
    if reuse not in REUSE_MODES:
        raise ValueError(f"reuse must be one of {REUSE_MODES}, not {reuse!r}")
    return (["smtp-source"] + (["-d"] if reuse == "yes" else [])
            + ["-s", str(sessions), "-m", str(messages), "-l", str(size),
               "-f", SENDER, "-t", RECIPIENT, f"{address}:{port}"])


def run_smtp_source(address: str, port: int, messages: int, sessions: int, size: int, reuse: str) -> list[str]:
    """Run smtp-source; what it said on stderr (warnings it went on after).  A failure
    ends the benchmark: its figures would be of a load that was not sent."""
    done = subprocess.run(smtp_source_command(address, port, messages, sessions, size, reuse),
                          check=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        raise SystemExit(f"bench: smtp-source exit status {done.returncode}:\n{done.stderr}")
    return done.stderr.splitlines()


def shares(messages: int, sessions: int) -> list[int]:
    """How many messages each of *sessions* sends: as even as possible, none empty."""
    sessions = max(1, min(sessions, messages))
    return [messages // sessions + (1 if i < messages % sessions else 0) for i in range(sessions)]


def run_builtin(address: str, port: int, messages: int, sessions: int, size: int, reuse: str) -> list[str]:
    """smtp-source's load from Python: *sessions* concurrent sessions, each sending
    its share over one connection (``reuse == "yes"``) or one connection per message."""
    import trio

    if reuse not in REUSE_MODES:
        raise ValueError(f"reuse must be one of {REUSE_MODES}, not {reuse!r}")
    body = b"Subject: bench\r\n\r\n" + (b"x" * 78 + b"\r\n") * max(1, size // 80) + b".\r\n"
    txn = f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RECIPIENT}>\r\nDATA\r\n".encode() + body

    async def connection(count: int) -> None:
        stream = await trio.open_tcp_stream(address, port)
        buf = b""

        async def expect(n: int) -> None:
            nonlocal buf
            while buf.count(b"\r\n") < n:
                data = await stream.receive_some(65536)
                if not data:
                    raise SystemExit("bench: the server closed the connection")
                buf += data
            lines = buf.split(b"\r\n")
            buf = b"\r\n".join(lines[n:])
            for line in lines[:n]:
                if not line.startswith((b"2", b"3")):
                    raise SystemExit(f"bench: server said {line!r}")

        async with stream:
            await expect(1)
            await stream.send_all(b"HELO bench.client\r\n")
            await expect(1)
            for _ in range(count):
                await stream.send_all(txn)
                await expect(4)
            await stream.send_all(b"QUIT\r\n")
            await expect(1)

    async def session(count: int) -> None:
        if reuse == "yes":
            await connection(count)
        else:
            for _ in range(count):
                await connection(1)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for count in shares(messages, sessions):
                nursery.start_soon(session, count)

    trio.run(main)
    return []  # it stops at the first failure instead


def run_load(generator: str, address: str, port: int, messages: int, sessions: int, size: int,
             reuse: str) -> list[str]:
    """Send the load; what the generator complained about (nothing when all went well)."""
    run = run_smtp_source if generator == "smtp-source" else run_builtin
    return run(address, port, messages, sessions, size, reuse)


def measure_latency(address: str, port: int, reuse: str, count: int = 200) -> tuple[float, float]:
    """p50 and p99 of one message at a time: MAIL to the final 250 over one
    connection (reuse), or connect to the final 250 on a new connection each."""
    import smtplib

    body = b"Subject: latency\r\n\r\n" + b"x" * 1000 + b"\r\n"
    times = []
    if reuse == "yes":
        with smtplib.SMTP(address, port, timeout=30) as client:
            client.ehlo("bench.client")
            for _ in range(count):
                began = time.perf_counter()
                client.sendmail(SENDER, [RECIPIENT], body)
                times.append(time.perf_counter() - began)
    else:
        for _ in range(count):
            began = time.perf_counter()
            with smtplib.SMTP(address, port, timeout=30) as client:
                client.ehlo("bench.client")
                client.sendmail(SENDER, [RECIPIENT], body)
                times.append(time.perf_counter() - began)
    times.sort()
    return times[len(times) // 2], times[min(len(times) - 1, int(len(times) * 0.99))]
