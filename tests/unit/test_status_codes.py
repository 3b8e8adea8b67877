"""Unit tests for smartmail.feedback.status_codes: RFC 3463 codes and diagnostic words → hard or soft."""

from __future__ import annotations

import pytest

from smartmail.feedback.findings import Kind
from smartmail.feedback.status_codes import effective_status, enhanced_status, failure_kind, reply_status

HARD, SOFT = Kind.HARD_BOUNCE, Kind.SOFT_BOUNCE


@pytest.mark.parametrize(
    ("status", "diagnostic", "kind"),
    [
        # RFC 3463 section 3.2: the recipient's address.
        ("5.1.1", None, HARD),
        ("5.1.2", None, HARD),
        ("5.1.3", None, HARD),
        ("5.1.6", None, HARD),
        ("5.1.10", "550 5.1.10 RESOLVER.ADR.RecipientNotFound", HARD),  # RFC 7505 null MX, and Exchange's use
        ("5.1.7", None, SOFT),  # the sender's address
        ("5.1.8", None, SOFT),
        ("5.1.11", None, SOFT),
        ("5.1.0", None, HARD),  # some address problem, nothing says the sender's
        ("5.1.0", "553 5.1.0 Sender address rejected: domain not found", SOFT),
        # Section 3.3: the mailbox.
        ("5.2.1", "550 5.2.1 The email account that you tried to reach is disabled", HARD),
        ("5.2.2", "552 5.2.2 Mailbox full", SOFT),
        ("5.2.3", None, SOFT),
        ("5.2.0", "550 5.2.0 Mailbox unavailable", HARD),
        ("5.2.0", "552 5.2.0 quota exceeded", SOFT),
        # Sections 3.4-3.8: not the address.
        ("5.3.0", None, SOFT),
        ("5.4.4", "Host or domain name not found", SOFT),
        ("5.4.1", "550 5.4.1 Recipient address rejected: Access denied. AS(201806281)", HARD),  # Exchange DBEB
        ("5.4.1", "550 5.4.1 Relay access denied", SOFT),
        ("5.5.0", "550 5.5.0 Requested action not taken: mailbox unavailable", HARD),
        ("5.6.1", None, SOFT),
        ("5.7.1", "554 5.7.1 Service unavailable; Client host blocked using zen.spamhaus.org", SOFT),
        ("5.7.1", "550 5.7.1 Recipient address rejected: user unknown", SOFT),  # policy codes never blame the address
        ("5.7.0", "550 5.7.0 no such user", SOFT),
        # Vague 5.0.0: the words.
        ("5.0.0", "554 delivery error: dd This user doesn't have a yahoo.com account (x@yahoo.com) [0]", HARD),
        ("5.0.0", "550 Requested action not taken: mailbox unavailable (spam)", SOFT),
        ("5.0.0", "550 No such user here", HARD),
        ("5.0.0", "550 <x@example.org>... User unknown", HARD),
        ("5.0.0", "550 Unrouteable address", HARD),
        ("5.0.0", "550 x@example.org is not listed in Domino Directory", HARD),
        ("5.0.0", "552 over quota", SOFT),
        ("5.0.0", "554 Service unavailable", SOFT),
        ("5.0.0", None, SOFT),
        # Transient.
        ("4.2.2", "452 4.2.2 The email account that you tried to reach is over quota", SOFT),
        ("4.1.1", "450 4.1.1 user unknown (try later)", SOFT),
        ("4.4.7", None, SOFT),
        # No status field at all: the words, else soft.
        (None, "550 user unknown", HARD),
        (None, None, SOFT),
    ],
)
def test_failure_kind(status, diagnostic, kind):
    assert failure_kind(effective_status(status, diagnostic), diagnostic) is kind


def test_unknown_default_applies_only_without_a_code():
    assert failure_kind(None, "it failed", unknown=HARD) is HARD
    assert failure_kind(None, "mailbox full", unknown=HARD) is SOFT
    assert failure_kind("5.7.1", "it failed", unknown=HARD) is SOFT


@pytest.mark.parametrize(
    ("text", "status"),
    [
        ("5.1.1", "5.1.1"),
        ("5.1.10 (recipient not found)", "5.1.10"),
        ("#5.1.1", "5.1.1"),
        ("4.4.7", "4.4.7"),
        ("5.1", None),
        ("unknown", None),
        ("", None),
        (None, None),
    ],
)
def test_enhanced_status(text, status):
    assert enhanced_status(text) == status


@pytest.mark.parametrize(
    ("text", "status"),
    [
        ("550 5.1.1 <a@b>: Recipient address rejected", "5.1.1"),
        ("550-5.1.1 The email account that you tried to reach does not exist", "5.1.1"),
        ("#550 5.1.1 RESOLVER.ADR.RecipNotFound; not found ##", "5.1.1"),
        ("554 delivery error: dd This user doesn't have a yahoo.com account", "5.0.0"),
        ("host mx.example.org[203.0.113.5] said: 452 too many recipients", "4.0.0"),
        ("connect to 192.0.2.250:25: Connection timed out", None),  # addresses and ports are not replies
        ("user5001@example.org failed on 2026-12-04", None),
        ("", None),
    ],
)
def test_reply_status(text, status):
    assert reply_status(text) == status


@pytest.mark.parametrize(
    ("status", "diagnostic", "effective"),
    [
        ("5.0.0", "smtp; 550 5.1.1 User unknown", "5.1.1"),  # vague field, finer reply
        ("5.1.1", "550 5.7.1 blocked", "5.1.1"),  # the field is specific: it wins
        ("5.0.0", "451 4.7.1 greylisted", "5.0.0"),  # another class: the field wins
        (None, "550 5.2.2 mailbox full", "5.2.2"),
        (None, "550 no such user", "5.0.0"),
        ("garbage", None, None),
    ],
)
def test_effective_status(status, diagnostic, effective):
    assert effective_status(status, diagnostic) == effective
