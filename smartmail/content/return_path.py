"""VERP return paths: an envelope sender naming its message, signed, so a bounce says which message bounced."""

from __future__ import annotations

import base64
import functools
import hmac
import re

from smartmail.config import get_settings
from smartmail.content.signing import derived_key

PURPOSE = "return-path"
# `<local part>+<message id>.<signature>@<bounce domain>`: the message id is a ULID (26 characters of
# Crockford base32), the signature 16 characters of base32 (80 bits). Both are matched without
# regard to case: some relays lower-case the local part of the address they bounce to.
_TOKEN = re.compile(r"([0-9a-hjkmnp-tv-z]{26})\.([a-z2-7]{16})", re.IGNORECASE)


def _signature(key: bytes, message_id: str) -> str:
    # base32, not signing's base64url: a relay that case-folds the address would break that.
    digest = hmac.digest(key, message_id.upper().encode(), "sha256")
    return base64.b32encode(digest[:10]).decode().lower()


@functools.lru_cache(maxsize=8)
def _prefix_and_key(secret: str, localpart: str, domain: str) -> tuple[str, str, bytes]:
    return f"{localpart}+", f"@{domain.lower()}", derived_key(secret, PURPOSE)


def bounce_address(message_id: str) -> str | None:
    """The envelope sender for a message (RFC 5321 reverse-path) when SMARTMAIL_BOUNCE_DOMAIN is
    set: `bounce+<id lower-case>.<signature>@<bounce domain>`; None when it is not (the sender's
    own address is the return path then). At most 64 characters before the `@` (RFC 5321 4.5.3.1.1)."""
    settings = get_settings()
    if not settings.bounce_domain:
        return None
    prefix, suffix, key = _prefix_and_key(settings.secret_key, settings.bounce_localpart, settings.bounce_domain)
    return f"{prefix}{message_id.lower()}.{_signature(key, message_id)}{suffix}"


def message_of(address: str) -> str | None:
    """The message id (upper-case, as stored) a VERP address names, when its signature matches;
    None for any other address, a forged or altered token, or one signed with another key."""
    settings = get_settings()
    if not settings.bounce_domain:
        return None
    prefix, suffix, key = _prefix_and_key(settings.secret_key, settings.bounce_localpart, settings.bounce_domain)
    address = address.strip().strip("<>")
    local, _, domain = address.rpartition("@")
    if "@" + domain.lower() != suffix or not local.lower().startswith(prefix.lower()):
        return None
    match = _TOKEN.fullmatch(local[len(prefix) :])
    if match is None:
        return None
    message_id, given = match.group(1).upper(), match.group(2).lower()
    return message_id if hmac.compare_digest(given, _signature(key, message_id)) else None
