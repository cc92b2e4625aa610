"""``trimail config`` as postconf(1): -h (values only), -H (names only), -d (defaults,
not main.cf's), -n, -x, and the option pairs postconf refuses."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import trimail
from trimail.config import Config

MAIN_CF = "myhostname = mx.example.test\nmynetworks = 127.0.0.0/8\nmyorigin = $mydomain\nrelayhost =\n"


@pytest.fixture
def main_cf(tmp_path):
    path = tmp_path / "main.cf"
    path.write_text(MAIN_CF)
    return path


def test_h_prints_values_only_in_the_order_asked(main_cf):
    shown = trimail("config", "-h", "myorigin", "myhostname", "relayhost", "-c", str(main_cf))
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == "$mydomain\nmx.example.test\n\n"  # an empty value is an empty line
    assert trimail("config", "-hx", "myorigin", "-c", str(main_cf)).stdout == "example.test\n"


def test_h_with_n_prints_the_explicit_values_only(main_cf):
    shown = trimail("config", "-n", "-h", "-c", str(main_cf))
    assert shown.stdout.splitlines() == ["mx.example.test", "127.0.0.0/8", "$mydomain", ""]


def test_capital_h_prints_names_only(main_cf):
    assert trimail("config", "-nH", "-c", str(main_cf)).stdout.split() == [
        "myhostname", "mynetworks", "myorigin", "relayhost"]


def test_d_prints_the_defaults_not_main_cf(main_cf):
    defaults = Config({}, "defaults")
    shown = trimail("config", "-d", "myorigin", "mynetworks", "myhostname", "-c", str(main_cf))
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines() == [
        "myorigin = $myhostname", f"mynetworks = {defaults.raw('mynetworks')}".rstrip(),
        f"myhostname = {defaults.raw('myhostname')}"]
    assert "mx.example.test" not in shown.stdout
    assert trimail("config", "-dh", "myorigin", "-c", str(main_cf)).stdout == "$myhostname\n"
    assert trimail("config", "-dhx", "myorigin", "-c", str(main_cf)).stdout == defaults.expand("myorigin") + "\n"


def test_d_needs_no_readable_main_cf(tmp_path):
    shown = trimail("config", "-dh", "queue_run_delay", "-c", str(tmp_path / "missing.cf"))
    assert shown.returncode == 0 and shown.stdout == "300s\n"


def test_d_lists_every_parameter_at_its_default(main_cf):
    lines = trimail("config", "-d", "-c", str(main_cf)).stdout.splitlines()
    assert "myorigin = $myhostname" in lines and "queue_run_delay = 300s" in lines
    assert [line.split(" =")[0] for line in lines] == sorted(line.split(" =")[0] for line in lines)


@pytest.mark.parametrize("options", [["-d", "-n"], ["-dn"], ["-h", "-H"], ["-d", "-o", "myhostname=x"]])
def test_incompatible_options_are_refused_as_postconf_does(main_cf, options):
    refused = trimail("config", *options, "-c", str(main_cf))
    assert refused.returncode == 2 and "specify one of -" in refused.stderr and refused.stdout == ""


@pytest.mark.skipif(shutil.which("postconf") is None, reason="Postfix's postconf is not installed")
@pytest.mark.parametrize("options", [["-h"], ["-hx"], ["-dh"], ["-H"]])
def test_same_output_as_postfix_postconf(main_cf, options):
    names = ["myhostname", "mynetworks", "myorigin", "relayhost"]
    if options == ["-dh"]:
        names = ["myorigin", "relayhost", "queue_run_delay", "maximal_queue_lifetime"]
    postfix = subprocess.run(["postconf", "-c", str(main_cf.parent), *options, *names], capture_output=True,
                             text=True, timeout=30, check=False)
    ours = trimail("config", *options, *names, "-c", str(main_cf))
    assert postfix.returncode == ours.returncode == 0, (postfix.stderr, ours.stderr)
    assert ours.stdout == postfix.stdout
