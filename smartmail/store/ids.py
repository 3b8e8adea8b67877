"""Message ids: 26-character, time-ordered (ULID layout), so new rows land at the end of the primary-key index."""

from __future__ import annotations

import base64
import os
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32
# Every pair of digits, by the 10 bits it spells: 13 look-ups an id instead of 26 divmods.
_PAIRS = [high + low for high in _ALPHABET for low in _ALPHABET]
# RFC 4648 base32 spells 5 bits a digit, most significant first, as the ULID layout does; only
# the alphabet differs. 80 random bits are 10 bytes, 16 digits: no padding.
_TO_CROCKFORD = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", _ALPHABET.encode())


def _spelled(value: int, digits: int) -> str:
    """The low `digits` (even) base32 digits of `value`, most significant first."""
    return "".join([_PAIRS[(value >> shift) & 1023] for shift in range(5 * digits - 10, -1, -10)])


def new_id() -> str:
    """48 bits of milliseconds then 80 random bits, as in the ULID spec (github.com/ulid/spec)."""
    return _spelled((time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big"), 26)


def new_ids(count: int) -> list[str]:
    """`count` ids as new_id makes them, in one go for a campaign's fan-out (one per recipient):
    the time spelled once, the random parts in one call."""
    prefix = _spelled(time.time_ns() // 1_000_000, 10)
    randomness = base64.b32encode(os.urandom(10 * count)).translate(_TO_CROCKFORD).decode()
    return [prefix + randomness[start : start + 16] for start in range(0, 16 * count, 16)]
