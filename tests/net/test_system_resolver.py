"""Resolvers without dns_nameservers read /etc/resolv.conf, parsed once and again
whenever the file changes (every start and reload makes two resolvers)."""

from __future__ import annotations

import os

from trimail.net import dns as tdns


def nameservers(resolver: tdns.Resolver) -> list[str]:
    return [str(ns) if isinstance(ns, str) else ns.address for ns in resolver._resolver.nameservers]


def test_a_changed_resolv_conf_is_read_again_and_resolvers_keep_their_own_settings(tmp_path, monkeypatch):
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 127.0.0.5\n")
    monkeypatch.setattr(tdns, "RESOLV_CONF", str(conf))
    monkeypatch.setattr(tdns, "_system", None)
    first, second = tdns.Resolver(lifetime=2.0), tdns.Resolver(lifetime=7.0)
    assert nameservers(first) == nameservers(second) == ["127.0.0.5"]
    assert first._resolver.lifetime == 2.0 and second._resolver.lifetime == 7.0
    assert first._resolver.cache is not second._resolver.cache
    conf.write_text("nameserver 127.0.0.6\nnameserver 127.0.0.7\n")
    os.utime(conf, ns=(0, os.stat(conf).st_mtime_ns + 1_000_000_000))  # a new mtime even within one tick
    assert nameservers(tdns.Resolver()) == ["127.0.0.6", "127.0.0.7"]
    assert nameservers(first) == ["127.0.0.5"]  # made before the change: unchanged


def test_no_resolv_conf_means_the_local_resolver(tmp_path, monkeypatch):
    monkeypatch.setattr(tdns, "RESOLV_CONF", str(tmp_path / "missing"))
    monkeypatch.setattr(tdns, "_system", None)
    assert nameservers(tdns.Resolver()) == ["127.0.0.1"]
