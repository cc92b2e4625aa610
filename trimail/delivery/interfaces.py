"""This host's own IP addresses, for mail loop detection (Postfix's own_inet_addr_list).

A listener on ``0.0.0.0`` or ``[::]`` accepts connections to every address of the
host, so "is this MX address me?" needs the list of those addresses.  They are read
without a shell or a helper program:

- IPv4: the ``SIOCGIFCONF`` ioctl on a datagram socket (every IPv4 address of every
  interface that is up, aliases included; what Postfix's inet_addr_local() uses where
  getifaddrs() is missing), plus all of 127.0.0.0/8, which Linux routes to ``lo``
  whatever is configured;
- IPv6: ``/proc/net/if_inet6`` (every IPv6 address, one per line), plus ``::1``.

Where neither exists (not Linux) the fallback is loopback plus the addresses of
``gethostname()`` from getaddrinfo.  Failures never propagate: a host whose addresses
cannot be read gets the fallback, and a warning in the log.

The list is read once per ``OwnAddresses`` (the delivery agent makes one at start and
re-reads it every ``REFRESH`` seconds, so an address a DHCP lease adds is learnt).

Security notes: the ioctl buffer is bounded (``MAX_INTERFACES`` entries); the /proc
file is read with a size bound; nothing here takes input from the network.
"""

from __future__ import annotations

import array
import fcntl
import ipaddress
import logging
import socket
import struct
import time

log = logging.getLogger("trimail.smtp")

SIOCGIFCONF = 0x8912
IFREQ_SIZE = 40 if struct.calcsize("P") == 8 else 32  # struct ifreq: 16 bytes of name, then a union
MAX_INTERFACES = 1024
REFRESH = 300.0
LOOPBACK_V4 = ipaddress.ip_network("127.0.0.0/8")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _ipv4_interface_addresses() -> set[IPAddress]:
    size = IFREQ_SIZE * MAX_INTERFACES
    buf = array.array("B", bytes(size))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        result = fcntl.ioctl(sock.fileno(), SIOCGIFCONF, struct.pack("iL", size, buf.buffer_info()[0]))
    used = min(struct.unpack("iL", result)[0], size)
    data = buf.tobytes()
    found: set[IPAddress] = set()
    for offset in range(0, used - IFREQ_SIZE + 1, IFREQ_SIZE):
        family = struct.unpack_from("H", data, offset + 16)[0]
        if family == socket.AF_INET:
            found.add(ipaddress.IPv4Address(data[offset + 20:offset + 24]))
    return found


def _ipv6_interface_addresses(path: str = "/proc/net/if_inet6") -> set[IPAddress]:
    found: set[IPAddress] = set()
    with open(path, encoding="ascii", errors="replace") as file:
        for line in file.read(1 << 20).splitlines():
            word = line.split(" ", 1)[0]
            if len(word) == 32:
                try:
                    found.add(ipaddress.IPv6Address(bytes.fromhex(word)))
                except ValueError:
                    continue
    return found


def _hostname_addresses() -> set[IPAddress]:
    found: set[IPAddress] = set()
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return found
    for info in infos:
        try:
            found.add(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]))
        except ValueError:
            continue
    return found


def interface_addresses() -> set[IPAddress]:
    """Every IP address this host answers on (beyond 127.0.0.0/8, which ``is_mine``
    covers as a range)."""
    found: set[IPAddress] = {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
    complete = True
    for reader in (_ipv4_interface_addresses, _ipv6_interface_addresses):
        try:
            found |= reader()
        except (OSError, ValueError, struct.error) as exc:
            complete = False
            log.debug("reading interface addresses with %s: %s", reader.__name__, exc)
    if not complete:
        found |= _hostname_addresses()
    return found


class OwnAddresses:
    """"Is this address one of mine?", with the interface list cached for REFRESH seconds."""

    def __init__(self, reader=interface_addresses) -> None:
        self._reader = reader
        self._addresses: set[IPAddress] = set()
        self._read_at = -REFRESH

    def all(self) -> set[IPAddress]:
        now = time.monotonic()
        if now - self._read_at >= REFRESH:
            self._addresses = self._reader()
            self._read_at = now
        return self._addresses

    def is_mine(self, ip: IPAddress) -> bool:
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return (ip.version == 4 and ip in LOOPBACK_V4) or ip in self.all()
