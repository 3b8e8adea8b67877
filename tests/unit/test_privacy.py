"""IP truncation: the network address of the configured prefix, IPv4-mapped addresses as IPv4, garbage as None."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smartmail.feedback.privacy import truncate_ip


@pytest.mark.parametrize(
    ("ip", "v4", "v6", "stored"),
    [
        ("203.0.113.77", 24, 48, "203.0.113.0"),
        ("203.0.113.77", 16, 48, "203.0.0.0"),
        ("203.0.113.77", 32, 48, "203.0.113.77"),
        ("203.0.113.77", 0, 48, "0.0.0.0"),
        ("2001:db8:1:2:3:4:5:6", 24, 48, "2001:db8:1::"),
        ("2001:db8:1:abcd:3:4:5:6", 24, 56, "2001:db8:1:ab00::"),
        ("2001:db8:1:2:3:4:5:6", 24, 128, "2001:db8:1:2:3:4:5:6"),
        ("2001:DB8:0001::0006", 24, 128, "2001:db8:1::6"),  # stored in the canonical spelling
        ("::ffff:203.0.113.77", 24, 48, "203.0.113.0"),  # a dual-stack socket's IPv4 client
        ("::ffff:cb00:714d", 32, 48, "203.0.113.77"),
        ("fe80::1%eth0", 24, 48, "fe80::"),
        (" 198.51.100.9 ", 24, 48, "198.51.100.0"),
    ],
)
def test_truncation(ip, v4, v6, stored):
    assert truncate_ip(ip, v4, v6) == stored


@pytest.mark.parametrize(
    "garbage", [None, "", "   ", "unknown", "203.0.113", "203.0.113.256", "1.2.3.4, 5.6.7.8", "::g", "1.2.3.4/24"]
)
def test_what_is_not_an_address_is_not_stored(garbage):
    assert truncate_ip(garbage, 24, 48) is None


@pytest.mark.parametrize(("v4", "v6"), [(-1, 48), (33, 48), (24, -1), (24, 129)])
def test_prefixes_out_of_range_are_refused(v4, v6):
    with pytest.raises(ValueError, match="prefixes"):
        truncate_ip("203.0.113.77", v4, v6)


_ADDRESSES = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6))


@given(_ADDRESSES, st.integers(0, 32), st.integers(0, 128))
def test_the_stored_address_is_the_network_of_the_prefix(address, v4, v6):
    stored = truncate_ip(str(address), v4, v6)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = v4 if address.version == 4 else v6
    network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
    assert stored == str(network.network_address)
    assert truncate_ip(stored, v4, v6) == stored  # truncating again changes nothing


@given(_ADDRESSES)
def test_full_prefixes_keep_the_address(address):
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    assert truncate_ip(str(address), 32, 128) == str(address)


@given(st.text(max_size=60))
def test_any_text_is_an_address_or_none(text):
    try:
        ipaddress.ip_address(text.strip())
    except ValueError:
        assert truncate_ip(text, 24, 48) is None
    else:
        assert truncate_ip(text, 24, 48) is not None
