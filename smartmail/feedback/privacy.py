"""IP addresses as stored with tracking events: truncated to a network prefix, so no event names one host."""

from __future__ import annotations

import ipaddress


def truncate_ip(ip: str | None, v4_prefix: int, v6_prefix: int) -> str | None:
    """The network address of `ip`'s /`v4_prefix` (IPv4) or /`v6_prefix` (IPv6) block, as text:
    `203.0.113.77` at 24 is `203.0.113.0`, `2001:db8:1:2::9` at 48 is `2001:db8:1::`. A prefix of
    32 / 128 keeps the whole address. An IPv4-mapped IPv6 address (`::ffff:203.0.113.77`, what a
    dual-stack socket reports for an IPv4 client) is an IPv4 address and comes back as one. None
    for None, an empty string or anything that is not an IP address (a forwarded-for header is
    client-controlled; storing it unparsed would store whatever it says)."""
    if not 0 <= v4_prefix <= 32 or not 0 <= v6_prefix <= 128:
        raise ValueError(f"prefixes out of range: /{v4_prefix} (0-32), /{v6_prefix} (0-128)")
    if not ip:
        return None
    try:
        address = ipaddress.ip_address(ip.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        if mapped is None:
            # The scope (`fe80::1%eth0`) names a local interface, not the client: dropped with the host bits.
            bits = int(address) >> (128 - v6_prefix) << (128 - v6_prefix) if v6_prefix < 128 else int(address)
            return str(ipaddress.IPv6Address(bits))
        address = mapped
    bits = int(address) >> (32 - v4_prefix) << (32 - v4_prefix) if v4_prefix < 32 else int(address)
    return str(ipaddress.IPv4Address(bits))
