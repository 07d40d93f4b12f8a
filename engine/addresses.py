"""Client addresses, read fast.

Bots rotate addresses, so each request may bring one never seen before, and parsing it with
``ipaddress`` was 13 % of a refused hold's instructions (BENCHMARKS.md). A dotted-quad IPv4
address is read here with one regular expression; anything else (IPv6, or not an address)
is left to ``ipaddress``. ``tests/test_addresses.py`` checks both agree on every string.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from collections.abc import Callable, Iterable

from engine.settings import Network

# Exactly what ipaddress.IPv4Address accepts: four decimal octets up to 255, ASCII digits,
# no leading zeros. (``\d`` would also match other scripts' digits.)
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9][0-9]|[0-9])"
_IPV4 = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")


def ipv4(text: str) -> int | None:
    """The address as an integer if ``text`` is a dotted-quad IPv4 address, else None."""
    if _IPV4.fullmatch(text) is None:
        return None
    return int.from_bytes(socket.inet_aton(text), "big")


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """``ipaddress.ip_address``, but an IPv4 address written as IPv6 (``::ffff:a.b.c.d``,
    as a dual-stack socket or a proxy may give it) as its IPv4 self. Not an address with a
    scope (``fe80::1%eth0``), which Python takes whatever its length: a client-written hop
    of kilobytes would become a key of the worker's caches."""
    if "%" in text:
        raise ValueError(f"{text[:64]!r}: an address with a scope")
    ip = ipaddress.ip_address(text)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@functools.lru_cache(maxsize=16384)
def canonical(address: str) -> str:
    """The client address the limits and challenges key on.

    - An IPv4 address written as IPv6 (``::ffff:a.b.c.d``) as its IPv4 self: else every
      IPv4 client would share one IPv6 /64's buckets.
    - An IPv6 address as its /64 (``2001:db8:1:2::/64``), one subscriber's, as an IPv4
      address is one household's: a host picks any of its /64's addresses at will (and a
      phone's rotate), so per address, the caps of one per address (unspent challenges,
      live holds) would cap nothing.
    - Anything else as given."""
    if ":" not in address:
        return address
    try:
        ip = _ip(address)
    except ValueError:
        return address
    if ip.version == 4:
        return str(ip)
    return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))


def membership(networks: Iterable[Network]) -> Callable[[str], bool | None]:
    """``within(text)``: whether the address ``text`` is in one of ``networks``; None if
    ``text`` is not an address."""
    nets = tuple(networks)
    v4 = tuple((int(n.network_address), int(n.netmask)) for n in nets if n.version == 4)

    def within(text: str) -> bool | None:
        value = ipv4(text)
        if value is not None:
            return any(value & mask == base for base, mask in v4)
        try:
            ip = _ip(text)
        except ValueError:
            return None
        return any(ip in net for net in nets)

    return within


def networks(address: str) -> tuple[str, str | None]:
    """An address's networks for the limits: its IPv4 /24, or its IPv6 /64 and /48 (of an
    IPv6 address, or of the /64 ``canonical`` gives for it); the address itself if it is
    not one."""
    if ipv4(address) is not None:
        return f"{address.rpartition('.')[0]}.0/24", None  # the input is canonical
    try:
        ip = _ip(address)
    except ValueError:
        if not address.endswith("/64"):
            return address, None
        try:
            ip = ipaddress.IPv6Network(address).network_address
        except ValueError:
            return address, None
    if ip.version == 4:
        return f"{str(ip).rpartition('.')[0]}.0/24", None
    return (
        str(ipaddress.ip_network(f"{ip}/64", strict=False)),
        str(ipaddress.ip_network(f"{ip}/48", strict=False)),
    )
