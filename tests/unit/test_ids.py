"""Message ids spell the ULID layout in Crockford base32, in time order."""

from __future__ import annotations

import random
import re
import time

import pytest

from smartmail.store import ids

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _spelled(value: int) -> str:
    """The ULID spec's encoding, one base32 digit at a time from the lowest."""
    digits = []
    for _ in range(26):
        value, digit = divmod(value, 32)
        digits.append(CROCKFORD[digit])
    return "".join(reversed(digits))


def test_ids_spell_their_128_bits_as_the_spec_does(monkeypatch):
    rng = random.Random(7)
    values = [0, 1, 2**128 - 1, 2**80 - 1, 2**80] + [rng.getrandbits(128) for _ in range(2000)]
    for value in values:
        millis, randomness = value >> 80, value & (2**80 - 1)
        monkeypatch.setattr(ids.time, "time_ns", lambda millis=millis: millis * 1_000_000)
        monkeypatch.setattr(ids.os, "urandom", lambda n, randomness=randomness: randomness.to_bytes(n, "big"))
        assert ids.new_id() == _spelled(value)
        assert ids.new_ids(1) == [_spelled(value)]


def test_ids_made_in_one_go_share_the_time_and_spell_each_random_part():
    randomness = [random.Random(i).getrandbits(80) for i in range(3)]
    millis = 1_795_000_000_123

    def urandom(n):
        assert n == 30  # one call for all three
        return b"".join(r.to_bytes(10, "big") for r in randomness)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ids.time, "time_ns", lambda: millis * 1_000_000)
        patch.setattr(ids.os, "urandom", urandom)
        made = ids.new_ids(3)
    assert made == [_spelled(millis << 80 | r) for r in randomness]


def test_ids_are_26_characters_and_sort_by_time():
    first = ids.new_id()
    time.sleep(0.002)
    later = [ids.new_id() for _ in range(100)]
    assert all(re.fullmatch(r"[0-7][0-9A-HJKMNP-TV-Z]{25}", i) for i in [first, *later])
    assert all(first < i for i in later) and len(set(later)) == 100
