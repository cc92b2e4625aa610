"""``scripts/bench --mode testmta``: every contestant really runs (STARTTLS and AUTH
included), and the figures come out as a table and as JSON-ready numbers.
Addresses: 127.0.42.0/24."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import bench_args
import bench_testmta


def test_testmta_mode_is_a_bench_mode() -> None:
    assert bench_args.parse(["--mode", "testmta", "--runs", "30"]).runs == 30


def test_each_contestant_is_measured_and_tabled(monkeypatch, capsys) -> None:
    monkeypatch.setattr(bench_testmta, "HOST", "127.0.42.9")
    figures = bench_testmta.bench_test_mtas(1)
    json.dumps(figures)
    assert figures["runs"] == 1 and list(figures["figures"]) == list(bench_testmta.FIGURES)
    for row in figures["figures"].values():
        for name in bench_testmta.CONTESTANTS:
            assert 0 < row[name]["min_ms"] <= row[name]["median_ms"] <= row[name]["max_ms"]
        assert row["ratio_trimail_aiosmtpd"] == row["trimail"]["median_ms"] / row["aiosmtpd"]["median_ms"]
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == ("|  | trimail.testing | aiosmtpd Controller | smtpdfix | trimail / aiosmtpd |")
    assert [line.split(" | ")[0] for line in lines[4:]] == [
        "| start + stop", "| start + stop, STARTTLS and AUTH", "| 100 messages captured (one connection)"]
