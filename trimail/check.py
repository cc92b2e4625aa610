"""``trimail check`` (postfix check): configuration and files an operator should fix.

Returns warnings, one line each: compiled tables (``hash:``/``btree:``) that are
missing or older than their source file (run ``trimail postmap`` or
``trimail newaliases``), restriction lists that name an unknown restriction or
use one where it cannot work (``trimail/policy/engine.py``; serve refuses to
start with the same error), a queue directory others can read, and with
``chroot = yes`` the files serve would need from inside the jail but cannot reach
there (main.cf and the certificate for reload, lookup tables, resolv.conf).  serve logs the
same warnings when it starts.

The listening addresses are reported (what serve would bind, free or in use),
never bound: check reads the host's listening sockets from /proc/net/tcp and
tcp6 (elsewhere it tries to connect), so it can run beside a live serve, or
beside the MTA it replaces, without taking a port from either, even for a moment.

Parameters: queue_directory, mail_owner, allow_root, chroot, smtpd_workers,
smtpd_tls_cert_file, smtpd_tls_key_file, dns_nameservers, local_recipient_maps, the
tables of alias_maps, alias_database, transport_maps and virtual_alias_maps, the
listeners (smtpd_listen, submission_listen, smtps_listen, reinject_listen, metrics_listen) and the
smtpd_*_restrictions lists (through trimail.policy.engine), also as reinject_overrides sets them.
"""

from __future__ import annotations

import ipaddress
import socket
import stat
from pathlib import Path

from trimail.config import Config, ConfigError
from trimail.config.values import ListenAddress
from trimail.maps import compiled_path
from trimail.policy.engine import restriction_lists
from trimail.receive.context import listener_config

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

TABLE_PARAMETERS = ("alias_maps", "alias_database", "transport_maps", "virtual_alias_maps")


def table_refs(config: Config) -> list[tuple[str, str]]:
    refs = []
    for name in TABLE_PARAMETERS:
        for ref in config.get(name):
            refs.append((name, ref))
    for ref in config.local_recipient_maps:
        if not ref.startswith("$"):
            refs.append(("local_recipient_maps", ref.removeprefix("proxy:")))
    return refs


def warnings(config: Config, *, handing_over: bool = False) -> list[str]:
    """Every warning, one line each; *handing_over* (serve started as root, about
    to give the queue to mail_owner) leaves out the ownership warnings it will fix."""
    found: list[str] = []
    seen: set[str] = set()
    for parameter, ref in table_refs(config):
        kind, _, name = ref.partition(":")
        if kind not in ("hash", "btree") or name in seen:
            continue
        seen.add(name)
        source = Path(name)
        database = compiled_path(source)
        command = "trimail newaliases" if "alias" in parameter else f"trimail postmap {source}"
        if not database.exists():
            if source.exists():
                found.append(f"{parameter}: {database} does not exist; run {command}")
            else:
                found.append(f"{parameter}: neither {source} nor {database} exists")
            continue
        if source.exists() and source.stat().st_mtime > database.stat().st_mtime:
            found.append(f"{parameter}: database {database} is older than source file {source}; run {command}")
    try:
        restriction_lists(config)
        if config.reinject_listen:  # the content filter's way back has lists of its own (reinject_overrides)
            restriction_lists(listener_config(config, "reinject"))
    except ConfigError as exc:
        found.append(f"error: {exc}")
    found += _certificate(config)
    found += _jail(config)
    queue = Path(config.queue_directory)
    if queue.exists() and not handing_over:
        found += _ownership(queue, config.mail_owner, config.allow_root)
    return found


def _certificate(config: Config) -> list[str]:
    """The server certificate loads with its key and is not expired or about to."""
    if not config.smtpd_tls_cert_file:
        return []
    import ssl
    import time

    from trimail.net.tls import loaded_chain

    try:
        loaded_chain(config.smtpd_tls_cert_file, config.smtpd_tls_key_file)
        info = ssl._ssl._test_decode_cert(config.smtpd_tls_cert_file)  # noqa: SLF001 (stdlib, no parser else)
    except (OSError, ssl.SSLError, ValueError, AttributeError) as exc:
        return [f"error: smtpd_tls_cert_file {config.smtpd_tls_cert_file}: {exc}"]
    expires = ssl.cert_time_to_seconds(info["notAfter"])
    days = (expires - time.time()) / 86400
    if days < 0:
        return [f"error: smtpd_tls_cert_file {config.smtpd_tls_cert_file} expired on {info['notAfter']}"]
    if days < 21:
        return [f"smtpd_tls_cert_file {config.smtpd_tls_cert_file} expires in {days:.0f} days ({info['notAfter']})"]
    return []


FILE_TABLES = ("hash", "btree", "texthash", "cidr", "regexp", "pcre")


def _jail(config: Config) -> list[str]:
    """``chroot = yes``: what serve reads after entering the jail must be inside it.
    main.cf and the TLS certificate are read at start, before the jail, but a
    single-process reload reads them again (with workers the master and each new
    worker read them outside the jail); lookup tables are opened inside it, by their path there."""
    if not config.chroot:
        return []
    jail = Path(config.queue_directory).resolve()
    found = []
    needed = {str(config.path or ""): "main.cf", config.smtpd_tls_key_file: "smtpd_tls_key_file",
              config.smtpd_tls_cert_file: "smtpd_tls_cert_file"}
    for path, name in needed.items():  # with workers the master re-reads them, outside the jail
        if path and config.smtpd_workers == 0 and not Path(path).resolve().is_relative_to(jail):
            found.append(f"chroot = yes: {name} {path} lies outside the jail {jail}: reload cannot re-read it "
                         "(restart serve to apply a change)")
    if not config.dns_nameservers and not (jail / "etc" / "resolv.conf").exists():
        found.append(f"chroot = yes: dns_nameservers is empty and {jail}/etc/resolv.conf does not exist: "
                     "inside the jail DNS asks 127.0.0.1 (set dns_nameservers)")
    seen: set[str] = set()
    for parameter, ref in table_refs(config):
        kind, _, name = ref.partition(":")
        if kind not in FILE_TABLES or not name.startswith("/") or name in seen:
            continue
        seen.add(name)
        inside = jail / name.lstrip("/")
        wanted = compiled_path(inside) if kind in ("hash", "btree") else inside
        if not wanted.exists():
            found.append(f"chroot = yes: {parameter} {ref} is opened inside the jail, where {wanted} does not "
                         f"exist (name tables by their path inside {jail})")
    return found


def resolver_reachable(config: Config) -> list[str]:
    """The DNS resolvers answer (a query for the root's NS records, 3 s at most)."""
    import trio

    from trimail.net.dns import DnsError, Resolver

    async def probe() -> list[str]:
        try:
            await Resolver(config.dns_nameservers, lifetime=3).lookup(".", "NS")
        except DnsError as exc:
            where = ", ".join(map(str, config.dns_nameservers)) or "/etc/resolv.conf"
            return [f"DNS resolver ({where}) does not answer: {exc}"]
        return []

    return trio.run(probe)


LISTEN_PARAMETERS = ("smtpd_listen", "submission_listen", "smtps_listen", "reinject_listen", "metrics_listen")


def planned_listeners(config: Config) -> list[tuple[str, ListenAddress]]:
    """(parameter, address) for every listener serve would open."""
    return [(parameter, address) for parameter in LISTEN_PARAMETERS for address in config.get(parameter)]


def listening_sockets(proc: Path = Path("/proc/net")) -> set[tuple[int, IPAddress, int]] | None:
    """The TCP sockets in LISTEN state on this host (its network namespace), as
    (family, address, port), read from /proc/net/tcp and tcp6; None when they
    cannot be read (not Linux, no /proc)."""
    found: set[tuple[int, IPAddress, int]] = set()
    read_any = False
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        try:
            lines = (proc / name).read_text().splitlines()[1:]
        except OSError:
            continue
        read_any = True
        for line in lines:
            fields = line.split()
            if len(fields) < 4 or fields[3] != "0A":  # 0A: TCP_LISTEN
                continue
            address, _, port = fields[1].partition(":")
            try:
                raw = bytes.fromhex(address)
                # the kernel prints each 32-bit word in host byte order (little-endian here)
                packed = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                ip = ipaddress.ip_address(packed)
                found.add((family, ip, int(port, 16)))
            except ValueError:
                continue
    return found if read_any else None


def _conflicts(family: int, ip: IPAddress, port: int, taken: set[tuple[int, IPAddress, int]]) -> bool:
    """Whether a listener on (ip, port) would collide with one of *taken*: same family
    and port, and the same address or a wildcard on either side (serve's IPv6
    sockets are IPv6-only, so the families do not meet)."""
    for other_family, other_ip, other_port in taken:
        if other_family == family and other_port == port and (
                other_ip == ip or other_ip.is_unspecified or ip.is_unspecified):
            return True
    return False


def _addresses(address: ListenAddress) -> list[tuple[int, IPAddress]]:
    try:
        return [(socket.AF_INET6 if ":" in address.host else socket.AF_INET, ipaddress.ip_address(address.host))]
    except ValueError:  # a host name: the addresses it has now
        try:
            infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except OSError:
            return []
        return sorted({(int(family), ipaddress.ip_address(sockaddr[0].partition("%")[0]))
                       for family, _, _, _, sockaddr in infos}, key=str)


def _listening_by_connect(ip: IPAddress, port: int) -> bool:
    """Without /proc: whether something accepts connections on (ip, port); the
    wildcard is tried through loopback.  Connecting takes no port from anyone."""
    target = ip if not ip.is_unspecified else ipaddress.ip_address("::1" if ip.version == 6 else "127.0.0.1")
    family = socket.AF_INET6 if target.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((str(target), port)) == 0


def listeners_in_use(config: Config, proc: Path = Path("/proc/net")) -> tuple[list[str], list[str]]:
    """(report, problems) for the addresses serve would listen on: one report line
    per address (what serve would bind, and whether it is free), and an error for
    each address something else listens on already.  Never binds a socket: the
    listening sockets are read from /proc/net/tcp{,6} (else a connect is tried), so
    running check beside a live serve or another MTA disturbs neither."""
    taken = listening_sockets(proc)
    report, problems = [], []
    for parameter, address in planned_listeners(config):
        if address.port == 0:
            report.append(f"{parameter}: would listen on {address} (a port the system chooses)")
            continue
        resolved = _addresses(address)
        if not resolved:
            problems.append(f"error: {parameter}: cannot resolve {address.host}")
            continue
        busy = [ip for family, ip in resolved
                if (_conflicts(family, ip, address.port, taken) if taken is not None
                    else _listening_by_connect(ip, address.port))]
        if busy:
            report.append(f"{parameter}: would listen on {address}: in use")
            problems.append(f"error: {parameter}: cannot listen on {address}: Address already in use")
        else:
            report.append(f"{parameter}: would listen on {address}: free")
    return report, problems


def _ownership(queue: Path, owner: str, allow_root: bool) -> list[str]:
    """Queue files 0600 and directories 0700, owned by mail_owner."""
    import pwd

    found = []
    try:
        uid = pwd.getpwnam(owner).pw_uid
    except KeyError:
        return [f"mail_owner {owner!r} does not exist"]
    for path in [queue, *queue.iterdir()]:
        st = path.lstat()
        if stat.S_ISSOCK(st.st_mode) or stat.S_ISLNK(st.st_mode):
            continue
        if path.name == "pid" and path.parent == queue:  # root's (trimail.queue.lock), checked at start
            continue
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            found.append(f"{path} is accessible to other users (mode {mode:o}); expected "
                         f"{'700' if path.is_dir() else '600'}")
        if st.st_uid != uid and not (allow_root and st.st_uid == 0):
            found.append(f"{path} is owned by uid {st.st_uid}, not mail_owner {owner} (uid {uid})")
    return found

