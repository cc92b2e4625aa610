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

import statistics
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


STEPS = ("connect", "ehlo", "mail", "rcpt", "data", "dot", "quit")  # latency's steps, in order


def measure_latency(address: str, port: int, reuse: str, count: int = 200) -> dict[str, float]:
    """One message at a time, *count* of them: p50 and p99 (seconds) of the whole --
    MAIL to the final 250 over one connection (reuse), or connect to the final 250
    on a new connection each -- and the p50 of each step, from sending it to its
    reply (``connect``: to the banner; ``data``: DATA to 354; ``dot``: the content
    and its end to the final 250; ``quit``: one per message without reuse only).
    The steps show where one client's time goes, which throughput hides."""
    import socket

    content = b"Subject: latency\r\n\r\n" + b"x" * 1000 + b"\r\n.\r\n"
    commands = {"ehlo": b"EHLO bench.client\r\n", "mail": f"MAIL FROM:<{SENDER}>\r\n".encode(),
                "rcpt": f"RCPT TO:<{RECIPIENT}>\r\n".encode(), "data": b"DATA\r\n", "dot": content,
                "quit": b"QUIT\r\n"}
    steps: dict[str, list[float]] = {step: [] for step in STEPS}
    whole = []
    sock = None

    def step(name: str, expect: str, began: float | None = None) -> None:
        began = time.perf_counter() if began is None else began
        if name != "connect":
            sock.sendall(commands[name])
        reply = _reply(sock)
        steps[name].append(time.perf_counter() - began)
        if not reply.startswith(expect):
            raise SystemExit(f"bench: latency: {name} answered {reply[:200]!r}")

    try:
        for _ in range(count):
            began = time.perf_counter()
            if sock is None:
                sock = socket.create_connection((address, port), timeout=30)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                step("connect", "220", began)  # the handshake and the banner
                step("ehlo", "250")
                if reuse == "yes":
                    began = time.perf_counter()
            for name, expect in (("mail", "250"), ("rcpt", "250"), ("data", "354"), ("dot", "250")):
                step(name, expect)
            whole.append(time.perf_counter() - began)
            if reuse != "yes":
                step("quit", "221")
                sock.close()
                sock = None
    finally:
        if sock is not None:
            sock.close()
    whole.sort()
    figures = {"p50": whole[len(whole) // 2], "p99": whole[min(len(whole) - 1, int(len(whole) * 0.99))]}
    once = ("connect", "ehlo", "quit") if reuse == "yes" else ()
    figures.update({name: statistics.median(times) for name, times in steps.items() if times and name not in once})
    return figures


def _reply(sock) -> str:
    """One whole reply (the last line has a space after its code)."""
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise SystemExit("bench: latency: the MTA closed the connection")
        data += chunk
        lines = data.split(b"\r\n")
        if len(lines) > 1 and lines[-1] == b"" and lines[-2][3:4] != b"-":
            return data.decode("ascii", "replace")
