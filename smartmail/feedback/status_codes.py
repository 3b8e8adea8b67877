"""Hard or soft: a failed recipient's RFC 3463 status code, and the remote server's words when the code is vague."""

from __future__ import annotations

import re

from smartmail.feedback.findings import Kind

# RFC 3463 section 2: class.subject.detail, each a number of at most three digits.
_STATUS = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})")
# An SMTP reply inside a diagnostic: a basic code (RFC 5321 section 4.2), then, optionally, an
# enhanced code (RFC 2034 section 4); "550-5.1.1" is the first line of a multi-line reply.
_REPLY = re.compile(r"(?<![\w.-])([245])\d\d(?:[ -]+#?([245]\.\d{1,3}\.\d{1,3}))?(?![\w.])")
_LEADING_STATUS = re.compile(r"\s*#?([245]\.\d{1,3}\.\d{1,3})(?![\d.])")

# X.1.x subjects about the *sender's* address (RFC 3463 section 3.2; 5.1.11 is RFC 7505's null MX of
# the sender) and 5.1.9 (RFC 3886: relayed to a non-compliant mailer): not the recipient's fault.
_NOT_THE_RECIPIENT = {"7", "8", "9", "11"}
# "Other or undefined" codes (RFC 3463: X.Y.0) say nothing about the cause, so the server's words
# decide. X.6.0 (content) and X.7.0 (security, policy) stay soft whatever they say: DESIGN.md pauses
# the site on policy rejections, it never blames the address.
_VAGUE = {"0.0", "1.0", "2.0", "3.0", "4.0", "5.0"}

# Words that mean the rejection is about the sender, the content or the moment, not the address.
# Checked before the hard words: "550 Recipient address rejected: Access denied (spam)" is a policy.
_SOFT_WORDS = re.compile(
    r"quota|mailbox (?:is )?full|full mailbox|over ?quota|insufficient (?:system )?storage|storage limit|"
    r"exceed(?:ed|s)? .{0,30}(?:size|storage|limit)|too many|rate limit|try (?:again )?later|temporar|"
    r"greylist|graylist|spam|blocked|block ?list|blacklist|dnsbl|\brbl\b|reputation|policy|dmarc|\bspf\b|dkim|"
    r"virus|message content|content (?:rejected|filter)|relay(?:ing)? (?:access )?(?:denied|not permitted)|"
    r"not authori[sz]ed to relay|sender",
    re.IGNORECASE,
)
# Words that mean the address does not exist or takes no mail for good: the common phrasings of
# Postfix, Exim, Sendmail, Exchange, Gmail and Yahoo.
_HARD_WORDS = re.compile(
    r"user(?:name)? (?:is )?unknown|unknown (?:user|recipient|mailbox|address|local[- ]part)|no such "
    r"(?:user|mailbox|recipient|address|account)|does ?n[o']t exist|doesn'?t have an? .{0,40}account|"
    r"(?:user|recipient|mailbox|address|account) (?:was |is )?not found|mailbox (?:is )?unavailable|"
    r"recipient address rejected|invalid (?:recipient|mailbox|address|user)|not a valid (?:mailbox|user|recipient)|"
    r"(?:account|mailbox|address) (?:is |has been )?(?:disabled|deactivated|inactive|closed|suspended)|"
    r"no mailbox|unrouteable address|recipientnotfound|nosuchuser|not listed in (?:the )?(?:domino )?directory",
    re.IGNORECASE,
)
# Exchange Online's directory-based edge blocking answers "550 5.4.1 Recipient address rejected:
# Access denied. AS(201806281)" for addresses missing from the domain's directory (Microsoft Learn,
# "Fix email delivery issues for error code 5.4.1 in Exchange Online").
_EXCHANGE_NO_RECIPIENT = re.compile(r"recipient address rejected: access denied\. AS\(201806281\)", re.IGNORECASE)


def enhanced_status(text: str | None) -> str | None:
    """The RFC 3463 code a Status field holds (`5.1.1`, also `5.1.1 (user unknown)`), or None."""
    if not text:
        return None
    match = _LEADING_STATUS.match(text)
    return match.group(1) if match else None


def reply_status(text: str | None) -> str | None:
    """The status an SMTP reply in a diagnostic says: its enhanced code, else `X.0.0` from the basic
    code (550 → 5.0.0, 452 → 4.0.0); None when the text holds no reply."""
    found = reply_match(text[:1000] if text else None)
    return found[0] if found else None


def reply_match(text: str | None) -> tuple[str, int] | None:
    """The first SMTP reply in a text: (its status as reply_status gives it, where it starts)."""
    match = _REPLY.search(text) if text else None
    if match is None:
        return None
    return match.group(2) or f"{match.group(1)}.0.0", match.start()


def effective_status(status: str | None, diagnostic: str | None) -> str | None:
    """The most specific code known: the Status field, unless it is missing or vague (`5.0.0`) and the
    diagnostic's SMTP reply carries a finer one of the same class (Exchange reports `Status: 5.0.0`
    with `Diagnostic-Code: smtp; 550 5.1.1 …`)."""
    status = enhanced_status(status)
    from_reply = reply_status(diagnostic)
    if status is None:
        return from_reply
    if from_reply and from_reply[0] == status[0] and status.endswith(".0") and not from_reply.endswith(".0.0"):
        return from_reply
    return status


def failure_kind(status: str | None, diagnostic: str | None = None, *, unknown: Kind = Kind.SOFT_BOUNCE) -> Kind:
    """HARD_BOUNCE when the address itself is bad, SOFT_BOUNCE otherwise (see docs/deliverability.md).

    - 4.x.x: transient (RFC 3463 section 3.1), soft.
    - 5.1.x about the recipient (5.1.1 bad mailbox, 5.1.2 bad domain, 5.1.3 bad syntax, 5.1.6 moved,
      5.1.10 null MX, RFC 7505) and 5.2.1 (mailbox disabled): hard.
    - 5.2.2 (mailbox full, soft per RFC 3463 section 3.3's own note), 5.2.3, 5.2.4, 5.3.x (mail system),
      5.4.x (routing), 5.5.x (protocol), 5.6.x (content), 5.7.x (policy): soft, the address is not at fault.
    - Vague codes (X.Y.0, or no code at all): the diagnostic's words; without telling words, 5.1.0
      (an address problem) is hard, no code at all is `unknown`, the rest soft.
    """
    status = enhanced_status(status)
    text = diagnostic or ""
    if status is None:
        return _by_words(text, default=unknown)
    klass, subject, detail = status.split(".")
    if klass != "5":
        return Kind.SOFT_BOUNCE
    if f"{subject}.{detail}" in _VAGUE:
        return _by_words(text, default=Kind.HARD_BOUNCE if subject == "1" else Kind.SOFT_BOUNCE)
    if subject == "1":
        return Kind.SOFT_BOUNCE if detail in _NOT_THE_RECIPIENT else Kind.HARD_BOUNCE
    if subject == "2":
        return Kind.HARD_BOUNCE if detail == "1" else Kind.SOFT_BOUNCE
    if status == "5.4.1" and _EXCHANGE_NO_RECIPIENT.search(text):
        return Kind.HARD_BOUNCE
    return Kind.SOFT_BOUNCE


def _by_words(text: str, *, default: Kind) -> Kind:
    text = text[:1000]
    if _SOFT_WORDS.search(text):
        return Kind.SOFT_BOUNCE
    if _HARD_WORDS.search(text):
        return Kind.HARD_BOUNCE
    return default
