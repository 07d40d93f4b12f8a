"""The fast address reading agrees with ``ipaddress`` on every string, an IPv4 address
written as IPv6 (``::ffff:a.b.c.d``) read as the IPv4 address it is, and an IPv6 client
known by its /64."""

from __future__ import annotations

import ipaddress

from hypothesis import example, given, settings
from hypothesis import strategies as st

from engine.addresses import canonical, ipv4, membership, networks
from engine.settings import Network
from engine.web import _resolver

octets = st.one_of(
    st.integers(0, 300).map(str),
    st.integers(0, 99).map(lambda n: f"0{n}"),  # leading zeros
    st.sampled_from(["", " 1", "1 ", "+1", "-1", "0x1", "\u0661", "\u00b2", "1e2", "25\u096b"]),
)
dotted = st.lists(octets, min_size=1, max_size=6).map(".".join)
addresses = st.one_of(
    st.ip_addresses().map(str),
    dotted,
    st.text(alphabet="0123456789.:abcdef%", max_size=24),
    st.text(max_size=12),
)
NETS: tuple[Network, ...] = (
    ipaddress.ip_network("127.0.0.1/32"),
    ipaddress.ip_network("10.0.0.0/8"),
    ipaddress.ip_network("192.168.7.0/24"),
    ipaddress.ip_network("fd00::/8"),
)


def parsed(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if "%" in text:
        return None  # a scope (fe80::1%eth0): not a client's, and Python takes any length
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    return ip.ipv4_mapped or ip if ip.version == 6 else ip


def canon(text: str) -> str:
    """The address as the limits key on it: a mapped IPv4 address as itself, an IPv6
    address as its /64."""
    ip = parsed(text)
    if ip is None or ":" not in text:
        return text
    if ip.version == 4:
        return str(ip)
    return str(ipaddress.ip_network((int(ip), 64), strict=False))


@settings(max_examples=2000)
@given(addresses)
@example("1.2.3.4")
@example("01.2.3.4")
@example("1.2.3.256")
@example("\u0661.\u0662.\u0663.\u0664")  # Arabic-Indic digits
def test_ipv4_reads_what_ipaddress_reads(text: str) -> None:
    ip = parsed(text)
    assert ipv4(text) == (
        int(ip) if ip is not None and ip.version == 4 and ":" not in text else None
    )


@settings(max_examples=1000)
@given(addresses)
@example("::ffff:10.1.2.3")
@example("::FFFF:127.0.0.1")
@example("::ffff:0a01:0203")
def test_networks_and_membership_agree_with_ipaddress(text: str) -> None:
    ip = parsed(text)
    assert canonical(text) == canon(text)
    assert networks(canonical(text)) == networks(text)  # its networks, as before
    if ip is None:
        assert networks(text) == (text, None)
        assert membership(NETS)(text) is None
        return
    if ip.version == 4:
        expected = (str(ipaddress.ip_network(f"{ip}/24", strict=False)), None)
    else:
        expected = (
            str(ipaddress.ip_network(f"{ip}/64", strict=False)),
            str(ipaddress.ip_network(f"{ip}/48", strict=False)),
        )
    assert networks(text) == expected
    assert membership(NETS)(text) == any(ip in net for net in NETS)


def reference_client(peer: str, forwarded: str, trusted: frozenset[Network]) -> str:
    """The client address as the engine read it with ipaddress alone."""
    ip = parsed(peer)
    if ip is None or not any(ip in net for net in trusted):
        return canon(peer)
    for hop in reversed(forwarded.split(",")):
        hop = hop.strip()
        if not hop:
            continue
        ip = parsed(hop)
        if ip is None:
            return canon(peer)
        if not any(ip in net for net in trusted):
            return canon(hop)
    return canon(peer)


@settings(max_examples=1000)
@given(
    st.sampled_from(
        ["127.0.0.1", "10.1.2.3", "203.0.113.9", "fd00::1", "nonsense", "::ffff:127.0.0.1"]
    ),
    st.lists(
        st.one_of(
            addresses,
            st.sampled_from(["10.9.9.9", "fd00::2", " 127.0.0.1 ", "::ffff:203.0.113.7"]),
        )
    ),
)
def test_client_address_behind_proxies(peer: str, hops: list[str]) -> None:
    trusted = frozenset(NETS)
    forwarded = ", ".join(hops)
    assert _resolver(trusted)(peer, forwarded) == reference_client(peer, forwarded, trusted)


def test_a_hop_with_a_scope_is_not_an_address() -> None:
    """Python reads ``fe80::1%<anything>`` as an address, whatever its length: a client
    writing such a hop behind a trusted proxy made kilobytes a key of the worker's address
    caches. It is not an address now: the header is not believed past it."""
    hop = "2001:db8::1%" + "x" * 8000
    assert _resolver(frozenset(NETS))("10.1.2.3", f"203.0.113.9, {hop}") == "10.1.2.3"
    assert membership(NETS)(hop) is None
    assert networks(hop) == (hop, None)
