"""main.cf parsing, lazy expansion, typed parameters and errors with file:line."""

from __future__ import annotations

import socket

import pytest

from tests.conftest import trimail
from trimail import config
from trimail.config import Config, ConfigError, generate, registry
from trimail.config.syntax import parse_main_cf
from trimail.config.values import ListenAddress


def load_text(tmp_path, text: str, overrides=()) -> Config:
    path = tmp_path / "main.cf"
    path.write_text(text)
    return config.load(path, overrides)


def test_continuation_lines_and_comments(tmp_path):
    cfg = load_text(tmp_path, (
        "# a comment\n"
        "mydestination = example.com,\n"
        "    example.net\n"
        "   # indented comment is not a continuation\n"
        "\texample.org\n"
        "\n"
        "myhostname = mx.example.com\n"
    ))
    assert cfg.mydestination == ["example.com", "example.net", "example.org"]
    assert cfg.myhostname == "mx.example.com"


def test_hash_inside_a_value_is_not_a_comment(tmp_path):
    cfg = load_text(tmp_path, "smtpd_banner = $myhostname #1 ESMTP\nmyhostname = h.example\n")
    assert cfg.smtpd_banner == "h.example #1 ESMTP"


def test_expansion_is_lazy_and_recursive(tmp_path):
    cfg = load_text(tmp_path, (
        "mydestination = $myhostname, localhost.$mydomain, ${mydomain}\n"
        "myhostname = mx.$mydomain\n"
        "mydomain = example.com\n"
    ))
    assert cfg.mydestination == ["mx.example.com", "localhost.example.com", "example.com"]


def test_override_changes_what_depends_on_it(tmp_path):
    cfg = load_text(tmp_path, "myhostname = a.example.com\n", overrides=["myhostname=b.example.net"])
    assert cfg.smtpd_banner == "b.example.net ESMTP trimail"
    assert cfg.where("myhostname") == "-o myhostname"


def test_conditional_expansion(tmp_path):
    cfg = load_text(tmp_path, (
        "relayhost = [gw.example]\n"
        "smtpd_banner = x${relayhost?{ via $relayhost}}${relay_domains:{ no relay domains}}\n"
    ))
    assert cfg.smtpd_banner == "x via [gw.example] no relay domains"


def test_user_defined_parameters_expand_without_warning(tmp_path):
    cfg = load_text(tmp_path, "my_domains = a.example b.example\nrelay_domains = $my_domains\n")
    assert cfg.relay_domains == ["a.example", "b.example"]
    assert cfg.warnings == []


def test_unknown_parameter_warns_with_location(tmp_path):
    cfg = load_text(tmp_path, "myhostname = h.example\nmyhostnmae = typo.example\n")
    assert any("main.cf, line 2: unused parameter: myhostnmae=typo.example" in w for w in cfg.warnings)


def test_expansion_loop_is_an_error_with_location(tmp_path):
    with pytest.raises(ConfigError, match=r"main\.cf, line 2: .*loop: myorigin -> mydomain -> myorigin"):
        load_text(tmp_path, "myhostname = h.example.com\nmyorigin = $mydomain\nmydomain = $myorigin\n")


def test_self_reference_is_a_loop(tmp_path):
    with pytest.raises(ConfigError, match="loop"):
        load_text(tmp_path, "relay_domains = $relay_domains\n")


@pytest.mark.parametrize(
    "line, message",
    [
        ("smtpd_timeout = 5 minutes", r"main\.cf, line 1: parameter smtpd_timeout: bad time value or unit: 5 minutes"),
        ("message_size_limit = big", r"main\.cf, line 1: bad numerical configuration: message_size_limit = big$"),
        ("smtpd_recipient_limit = 1.5", r"main\.cf, line 1: bad numerical configuration: smtpd_recipient_limit = 1\.5$"),
        ("disable_vrfy_command = maybe", r"main\.cf, line 1: bad boolean configuration: disable_vrfy_command = maybe"),
        ("smtpd_listen = 127.0.0.1", r"main\.cf, line 1: parameter smtpd_listen: .*has no port"),
        ("smtpd_listen = 127.0.0.1:99999", r"main\.cf, line 1: parameter smtpd_listen: bad port"),
        ("mynetworks = 10.0.0.0/33", r"main\.cf, line 1: parameter mynetworks: bad network"),
        ("transport_maps = /etc/transport", r"main\.cf, line 1: parameter transport_maps: bad lookup table"),
        ("alias_maps = dbm:/etc/aliases", r"main\.cf, line 1: parameter alias_maps: unsupported lookup table type"),
        ("smtpd_forbid_bare_newline = sometimes", r"main\.cf, line 1: parameter smtpd_forbid_bare_newline"),
        ("dns_nameservers = ns.example", r"main\.cf, line 1: parameter dns_nameservers: .*IP addresses"),
        ("just some words", r"main\.cf, line 1: missing '='"),
        ("  leading = continuation", r"main\.cf, line 1: continuation line"),
        ("bad-name = 1", r"main\.cf, line 1: bad parameter name"),
    ],
)
def test_bad_values_fail_with_file_and_line(tmp_path, line, message):
    with pytest.raises(ConfigError, match=message):
        load_text(tmp_path, line + "\n")


def test_bad_override_names_the_option(tmp_path):
    with pytest.raises(ConfigError, match="-o smtpd_timeout: parameter smtpd_timeout"):
        load_text(tmp_path, "", overrides=["smtpd_timeout=soon"])
    with pytest.raises(ConfigError, match="use -o name=value"):
        load_text(tmp_path, "", overrides=["smtpd_timeout"])


@pytest.mark.parametrize("text, seconds", [("300s", 300), ("5m", 300), ("1h", 3600), ("5d", 432000),
                                           ("2w", 1209600), ("90", 90), ("1h30m", 5400)])
def test_time_units(tmp_path, text, seconds):
    assert load_text(tmp_path, f"smtpd_timeout = {text}\n").smtpd_timeout == seconds


def test_time_default_unit_is_per_parameter(tmp_path):
    assert load_text(tmp_path, "maximal_queue_lifetime = 3\n").maximal_queue_lifetime == 3 * 86400


@pytest.mark.parametrize("text, size", [("10240000", 10240000), ("0", 0), ("+65536", 65536)])
def test_sizes(tmp_path, text, size):
    assert load_text(tmp_path, f"message_size_limit = {text}\n").message_size_limit == size


def test_lists_listen_addresses_networks_and_maps(tmp_path):
    cfg = load_text(tmp_path, (
        "smtpd_listen = 127.0.0.1:25, [::1]:2525 *:26\n"
        "mynetworks = 192.0.2.0/24, [2001:db8::]/32 10.1.2.3\n"
        "transport_maps = hash:/etc/trimail/transport, inline:{ a.example=smtp:[h]:25, b=error:x }\n"
        "disable_vrfy_command = yes\n"
    ))
    assert cfg.smtpd_listen == [ListenAddress("127.0.0.1", 25), ListenAddress("::1", 2525),
                                ListenAddress("0.0.0.0", 26)]
    assert [str(n) for n in cfg.mynetworks] == ["192.0.2.0/24", "2001:db8::/32", "10.1.2.3/32"]
    assert cfg.transport_maps == ["hash:/etc/trimail/transport", "inline:{ a.example=smtp:[h]:25, b=error:x }"]
    assert cfg.disable_vrfy_command is True


def test_duplicate_entries_warn_and_last_wins():
    settings, warnings = parse_main_cf("myhostname = a\nmyhostname = b\n", "main.cf")
    assert settings["myhostname"].value == "b"
    assert warnings == ["main.cf, line 2: overriding earlier entry: myhostname=b"]


def test_hostname_defaults_follow_postfix():
    cfg = Config({}, "test")
    name = socket.gethostname().lower()
    expected = name if "." in name else name + ".localdomain"
    assert cfg.myhostname == expected
    rest = expected.partition(".")[2]
    assert cfg.mydomain == (rest if "." in rest else "localdomain")
    assert cfg.mydestination == [expected, f"localhost.{cfg.mydomain}", "localhost"]
    assert cfg.myorigin == expected


def test_mydomain_derives_from_configured_myhostname(tmp_path):
    cfg = load_text(tmp_path, "myhostname = mx.mail.example.com\n")
    assert cfg.mydomain == "mail.example.com"


def test_built_in_development_default(tmp_path, monkeypatch):
    monkeypatch.delenv("TRIMAIL_CONFIG", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setattr(config, "DEFAULT_CONFIG_FILE", tmp_path / "absent" / "main.cf")
    cfg = config.load(None)
    assert cfg.source == "built-in development default"
    assert cfg.smtpd_listen == [ListenAddress("127.0.0.1", 2525)]
    assert cfg.queue_directory == str(tmp_path / "state" / "trimail")
    assert [str(n) for n in cfg.mynetworks] == ["127.0.0.0/8", "::1/128"]


def test_trimail_config_environment_variable(tmp_path, monkeypatch):
    path = tmp_path / "env.cf"
    path.write_text("myhostname = env.example\n")
    monkeypatch.setenv("TRIMAIL_CONFIG", str(path))
    assert config.load(None).myhostname == "env.example"


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read configuration"):
        config.load(tmp_path / "nope.cf")


# -- the command ------------------------------------------------------------------


def test_config_command_prints_raw_expanded_and_non_default(tmp_path):
    path = tmp_path / "main.cf"
    path.write_text("myhostname = mx.example.com\nmydestination = $myhostname, example.com\n")
    shown = trimail("config", "mydestination", "-c", str(path))
    assert shown.returncode == 0 and shown.stdout == "mydestination = $myhostname, example.com\n"
    expanded = trimail("config", "-x", "mydestination", "-c", str(path))
    assert expanded.stdout == "mydestination = mx.example.com, example.com\n"
    non_default = trimail("config", "-n", "-c", str(path), "-o", "smtpd_timeout=60s")
    assert non_default.stdout.splitlines() == [
        "mydestination = $myhostname, example.com", "myhostname = mx.example.com", "smtpd_timeout = 60s"]
    everything = trimail("config", "-c", str(path))
    assert "queue_run_delay = 300s" in everything.stdout.splitlines()


def test_config_command_errors_exit_2_with_location(tmp_path):
    path = tmp_path / "main.cf"
    path.write_text("myhostname = ok.example\nsmtpd_timeout = never\n")
    result = trimail("config", "-c", str(path))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"trimail: fatal: {path}, line 2: parameter smtpd_timeout: bad time value or unit: never "
        "(use a number with unit s, m, h, d or w)")


def test_config_command_unknown_name_exits_2(tmp_path):
    path = tmp_path / "main.cf"
    path.write_text("")
    result = trimail("config", "no_such_parameter", "-c", str(path))
    assert result.returncode == 2 and "no_such_parameter: unknown parameter" in result.stderr


def test_usage_error_exits_2():
    assert trimail("config", "--no-such-flag").returncode == 2


def test_sample_main_cf_lists_every_parameter_and_is_current():
    from pathlib import Path

    sample = generate.sample_main_cf()
    for name, param in registry.PARAMETERS.items():
        assert f"#{name} =" in sample and param.doc in sample
    committed = Path(__file__).resolve().parents[2] / "docs" / "main.cf.sample"
    assert committed.read_text().rstrip("\n") == sample.rstrip("\n"), "run: trimail config --sample > docs/main.cf.sample"


def test_a_value_derived_from_a_configuration_is_made_once_per_configuration(tmp_path):
    from trimail import rewrite
    from trimail.net.session import SessionLimits

    cfg = load_text(tmp_path, "mydestination = example.com\nsmtpd_timeout = ${stress?{10s}:{300s}}\n")
    made = []
    assert cfg.memo("k", lambda: made.append(1) or len(made)) == 1
    assert cfg.memo("k", lambda: made.append(1) or len(made)) == 1 and made == [1]
    assert rewrite.Settings.from_config(cfg) is rewrite.Settings.from_config(cfg)
    assert rewrite.Settings.from_config(cfg).local_domains == frozenset({"example.com"})
    stress = SessionLimits.from_config(cfg, stress=True)
    assert stress is SessionLimits.from_config(cfg, stress=True)
    assert (stress.timeout, SessionLimits.from_config(cfg).timeout) == (10, 300)
    copy = cfg.with_overrides({"mydestination": "example.net"})  # its own values
    assert rewrite.Settings.from_config(copy).local_domains == frozenset({"example.net"})
    assert copy.memo("k", lambda: 2) == 2
