#!/usr/bin/env python3
"""atheris harness for the SMTP protocol core and the address parser.

    python scripts/fuzz_smtp.py -max_total_time=60          # libFuzzer options
    python scripts/fuzz_smtp.py -atheris_runs=20000

The invariant is the one the protocol tests state: whatever bytes arrive, split
wherever, only the peer-error kind of outcome may come out (a reply), never an
exception; the address parser raises only AddressError.  CI runs it for a bounded
time through tests/security/test_fuzz.py.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from trimail.smtp.address import AddressError, parse_path
    from trimail.smtp.events import NEED_DATA, Closed, DataEnd
    from trimail.smtp.server import ServerConnection, Settings
    from trimail.smtp import replies

SETTINGS = Settings(line_length_limit=128, message_size_limit=512, recipient_limit=5, hard_error_limit=10,
                    starttls=True, auth=True)


def drive(data: bytes, cut: int) -> None:
    conn = ServerConnection(SETTINGS)
    conn.greet()
    closed = False

    def pump() -> None:
        nonlocal closed
        while not closed:
            event = conn.next_event()
            if event is NEED_DATA:
                return
            if isinstance(event, Closed):
                closed = True
                return
            if event.needs_reply:
                conn.respond(replies.queued("F") if isinstance(event, DataEnd) else None)

    for piece in (data[:cut], data[cut:], b""):  # b"": end of file
        if closed:
            break
        if piece or not conn.closed:
            conn.receive_data(piece)
            pump()
        conn.data_to_send()


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    cut = fdp.ConsumeIntInRange(0, 64)
    rest = fdp.ConsumeBytes(fdp.remaining_bytes())
    drive(rest, cut)
    try:
        parse_path(rest.decode("utf-8", "replace")[:300], "TO:", utf8_allowed=bool(cut & 1))
    except AddressError:
        pass


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
