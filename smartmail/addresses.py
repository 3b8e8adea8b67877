"""Address and header validation: one place that decides what may reach an SMTP envelope or header."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from email.headerregistry import Address
from email.utils import getaddresses, parseaddr

from email_validator import EmailNotValidError, validate_email

from smartmail.errors import AddressError

# RFC 5322 section 2.2: a field name is printable US-ASCII except colon.
_HEADER_NAME = re.compile(r"[!-9;-~]+")
# Headers SmartMail writes itself; letting callers set them would allow spoofing or duplicates.
RESERVED_HEADERS = frozenset(
    h.lower()
    for h in (
        "From",
        "To",
        "Cc",
        "Bcc",
        "Subject",
        "Reply-To",
        "Message-ID",
        "Date",
        "MIME-Version",
        "Content-Type",
        "Content-Transfer-Encoding",
        "Sender",
        "Return-Path",
    )
)


@dataclass(frozen=True)
class Mailbox:
    """A validated mailbox: normalized address plus an optional display name."""

    address: str
    display_name: str = ""

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2]

    def __str__(self) -> str:
        if not self.display_name:
            return self.address
        local, _, domain = self.address.rpartition("@")
        return str(Address(display_name=self.display_name, username=local, domain=domain))


def reject_line_breaks(value: str, *, field: str) -> None:
    """CR or LF in a header value would let input inject headers (RFC 5322 section 2.2)."""
    if "\r" in value or "\n" in value or "\0" in value:
        raise AddressError("must not contain CR, LF or NUL characters", field=field)


def parse_mailbox(value: object, *, field: str = "address") -> Mailbox:
    """Validate `addr@example.com` or `Name <addr@example.com>`; domain lower-cased, IDNA-checked."""
    if not isinstance(value, str) or not value.strip():
        raise AddressError("an email address is required", field=field)
    if len(value) > 320:  # the column size; RFC 5321 section 4.5.3.1 caps the address itself at 254
        raise AddressError("must be at most 320 characters, display name included", field=field)
    result = _parse(value)
    if isinstance(result, str):
        raise AddressError(result, field=field)
    return result


# Producers repeat the same addresses (the default sender above all) and validation is slow, so
# results, including the reason a value is invalid, are memoized.
@functools.lru_cache(maxsize=8192)
def _parse(value: str) -> Mailbox | str:
    """A Mailbox, or the reason the value is not one."""
    if "\r" in value or "\n" in value or "\0" in value:
        return "must not contain CR, LF or NUL characters"
    if _PLAIN_ADDRESS.fullmatch(value):  # no display name, nothing to unquote: skip getaddresses()
        display_name, address = "", value
    else:
        parsed = getaddresses([value])
        if len(parsed) != 1:
            return "exactly one address is expected"
        display_name, address = parsed[0]
    if not address:
        return f"{value!r} is not an email address"
    if address not in value:
        # getaddresses() silently rewrites malformed input (drops whitespace inside the domain);
        # validate what was given, not its reinterpretation.
        return f"{value!r} is not a single well-formed address"
    try:
        valid = validate_email(address, check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError as exc:
        return str(exc)
    # Without SMTPUTF8 the envelope must be ASCII: an IDN domain goes out as its A-label (RFC 5890).
    return Mailbox(address=valid.ascii_email or valid.normalized, display_name=display_name)


def normalize_address(value: str) -> str:
    """The lower-cased form used as the suppression-list key."""
    return value.strip().lower()


def check_headers(headers: dict[str, str] | None, *, field: str = "headers") -> dict[str, str]:
    """Custom headers: valid names, no reserved names, no line breaks in values."""
    checked: dict[str, str] = {}
    for name, value in (headers or {}).items():
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            raise AddressError(f"{name!r} is not a valid header name", field=field)
        if name.lower() in RESERVED_HEADERS:
            raise AddressError(f"{name} is set by SmartMail and cannot be overridden", field=f"{field}.{name}")
        if not isinstance(value, str):
            raise AddressError("header values must be strings", field=f"{field}.{name}")
        reject_line_breaks(value, field=f"{field}.{name}")
        checked[name] = value
    return checked


def bare_address(stored: str) -> str:
    """`addr@domain` out of a stored, already validated `Name <addr@domain>` or `addr@domain`.
    A plain address is returned as it is: campaign recipients are, and each is seen once, so the
    memo below would only miss."""
    if _PLAIN_ADDRESS.fullmatch(stored):
        return stored
    return _parsed_address(stored)


_PLAIN_ADDRESS = re.compile(r"[^<>\"(),;:\\\s]+@[^<>\"(),;:\\\s@]+")


@functools.lru_cache(maxsize=65536)
def _parsed_address(stored: str) -> str:
    """Memoized: delivery asks for the sender and recipient of every message, and senders repeat."""
    return parseaddr(stored)[1]
