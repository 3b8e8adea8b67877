"""HMAC-SHA256 signatures for the tokens in links, keyed per purpose from SMARTMAIL_SECRET_KEY."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
from collections.abc import Callable

from smartmail.config import get_settings


@functools.lru_cache(maxsize=8)
def derived_key(secret: str, purpose: str) -> bytes:
    # Cached: a campaign signs tokens for every message. Keyed by the secret, so a new key is
    # derived when SMARTMAIL_SECRET_KEY changes (settings reloaded). One key per purpose: a token
    # signed for one (click tracking, say) never verifies as another (unsubscribe).
    return hmac.new(secret.encode(), b"smartmail.token:" + purpose.encode(), hashlib.sha256).digest()


def signer(purpose: str, *, length: int = 43) -> Callable[[str], str]:
    """A function giving the unpadded base64url HMAC-SHA256 (RFC 2104) of a payload, its first
    `length` characters (43: all 32 bytes; 22: 128 bits, still far beyond guessing), keyed for
    `purpose`: one key look-up for the many links of a message."""
    key = derived_key(get_settings().secret_key, purpose)

    def sign(payload: str) -> str:
        digest = hmac.digest(key, payload.encode(), "sha256")  # one-shot, in C
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()[:length]

    return sign


def signature(payload: str, purpose: str, *, length: int = 43) -> str:
    """The signature of one payload (see `signer`)."""
    digest = hmac.digest(derived_key(get_settings().secret_key, purpose), payload.encode(), "sha256")
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()[:length]


def matches(given: str, payload: str, purpose: str, *, length: int = 43) -> bool:
    """Whether `given` is the signature of `payload`, compared in constant time. The encoded forms
    are compared: a full signature's last base64 character carries unused bits, so comparing
    decoded bytes would accept several spellings of one signature."""
    return hmac.compare_digest(given, signature(payload, purpose, length=length))
