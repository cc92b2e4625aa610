"""One private Postfix and one trimail for the whole differential suite, with the DNS
server and the sink they share (started once: the sessions reuse them)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.differential import checks, harness, scenario


@dataclass
class Pair:
    dns: harness.DnsServer
    sink: harness.Sink
    postfix: harness.PrivatePostfix
    trimail: harness.Trimail


@pytest.fixture(scope="session")  # one pair: its DNS server holds port 53
def pair() -> Iterator[Pair]:
    if not harness.available():
        pytest.skip("needs root and Debian's postfix package")
    workdir = Path(tempfile.mkdtemp(prefix="trimail-differential-"))  # Postfix's user must reach it
    dns = harness.DnsServer(scenario.ZONE)
    sink = harness.Sink()
    postfix = trimail = None
    main_cf, tables = scenario.MAIN_CF + checks.MAIN_CF, {**scenario.TABLES, **checks.TABLES}
    try:
        postfix = harness.PrivatePostfix(workdir / "postfix", main_cf, tables, sink.port)
        trimail = harness.Trimail(workdir / "trimail", main_cf, tables, sink.port)
        yield Pair(dns, sink, postfix, trimail)
    finally:
        for mta in (trimail, postfix):
            if mta is not None:
                mta.stop()
        sink.close()
        dns.close()
        shutil.rmtree(workdir, ignore_errors=True)
