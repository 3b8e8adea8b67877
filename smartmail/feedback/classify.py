"""Inbound mail classified (bounce, delay, complaint, unsubscribe, auto-reply) into findings, without the database.

The order of the checks matters and is documented in docs/deliverability.md: machine-readable
reports first (RFC 3464 DSN, RFC 5965 ARF), then the unsubscribe mailto, then non-standard bounces
(flufl.bounce's detectors, only for mail that looks like a bounce), then auto-replies and
challenge-response mail, and last flufl.bounce again for anything else sent to a VERP address.
Bounces often carry `Auto-Submitted: auto-replied` (RFC 3834 section 5 asks MTAs to set it), so
that header is looked at only once the mail is known not to be a bounce.
"""

from __future__ import annotations

import email
import email.policy
import re
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import Message
from email.utils import collapse_rfc2231_value, getaddresses

from flufl.bounce import all_failures

from smartmail.content.return_path import message_of
from smartmail.content.unsubscribe_links import mailto_address
from smartmail.feedback import arf, dsn, mime_text
from smartmail.feedback.findings import Finding, Kind
from smartmail.feedback.status_codes import effective_status, failure_kind, reply_match, reply_status

BOUNCE = "bounce"
DELAYED = "delayed"  # RFC 3464 Action: delayed; informational, its SOFT_BOUNCE findings count toward nothing
COMPLAINT = "complaint"
UNSUBSCRIBE = "unsubscribe"
AUTO_REPLY = "auto_reply"
UNRECOGNISED = "unrecognised"
DIAGNOSTIC_MAX = dsn.DIAGNOSTIC_MAX


@dataclass(frozen=True)
class Classification:
    """What an inbound mail is. `findings` is empty for auto_reply and unrecognised; `detail` says why."""

    verdict: str  # bounce | delayed | complaint | unsubscribe | auto_reply | unrecognised
    findings: tuple[Finding, ...]
    detail: str | None = None


# Senders and subjects of delivery failures that are not RFC 3464 reports: the wording of Postfix,
# Exim, qmail, Sendmail, Exchange, Gmail, Yahoo and their translations.
_DAEMONS = {"mailer-daemon", "mailerdaemon", "mail-daemon", "postmaster", "mail-delivery-system"}
_DAEMON_NAMES = re.compile(r"mail delivery (?:subsystem|system|service)|mailer[- ]daemon", re.IGNORECASE)
_BOUNCE_SUBJECT = re.compile(
    r"undeliver(?:able|ed)|delivery status notification|(?:mail )?delivery (?:has )?failed|delivery failure|"
    r"failure notice|returned mail|non[- ]?delivery|could not be delivered|unable to deliver|"
    r"nondeliverable|unzustellbar|non remis|no se puede entregar|delivery problem",
    re.IGNORECASE,
)
# RFC 3834 section 5 (Auto-Submitted), and the headers and subjects of autoresponders that predate it.
_AUTO_HEADERS = ("X-Autoreply", "X-Autorespond", "X-Autoresponder", "X-Auto-Reply", "X-Vacation")
_AUTO_PRECEDENCE = {"auto_reply", "bulk", "junk"}
_AUTO_SUBJECT = re.compile(
    r"^\s*(?:auto(?:matic)?[ _-]?(?:reply|response|answer)|auto:|autoreply)|out of (?:the )?office|"
    r"\bvacation\b|abwesenheitsnotiz|automatische antwort|r[ée]ponse automatique|absence du bureau|"
    r"respuesta autom[aá]tica|fuera de la oficina|risposta automatica|fuori ufficio|resposta autom[aá]tica|"
    r"automatisch antwoord|afwezig|autosvar|fr[aå]nvaro",
    re.IGNORECASE,
)
# Challenge-response filters (Boxbe, SpamArrest, Mailbox Verification …) ask the sender to prove it
# is human before the recipient sees the message; no one will, so they are auto-replies to us.
_CHALLENGE_DOMAINS = ("boxbe.com", "spamarrest.com", "mailinblack.com", "choicemail.com")
_CHALLENGE_SUBJECT = re.compile(
    r"please confirm your (?:message|e-?mail)|confirm you are (?:a )?human|verify (?:your|that you are)|"
    r"sender verification|approval needed|awaiting your verification|mailbox verification",
    re.IGNORECASE,
)
_CHALLENGE_BODY = re.compile(
    r"confirm (?:that )?you are (?:a )?(?:human|real person)|(?:prove|verify) (?:that )?you are (?:a )?human|"
    r"not a (?:robot|spammer)|challenge[- ]response",
    re.IGNORECASE,
)
# An unsubscribe mail's subject is `unsubscribe <token>` (unsubscribe_links: the mailto URI sets it);
# only the token's shape is checked here, its signature by the caller (read_token).
_UNSUBSCRIBE = re.compile(r"\bunsubscribe[\s:]+([0-9]{1,19}\.[0-9]{0,19}\.[A-Za-z0-9_-]{1,64})(?![\w.-])", re.I)
# Where the part of a bounce about one recipient ends: the copy of the original message begins.
_ORIGINAL_BEGINS = re.compile(
    r"^(?:[ \t]*-{2,}.*(?:original|copy of|below this line|returned|headers)|Received:|Return-Path:)",
    re.IGNORECASE | re.MULTILINE,
)
_ABOUT_ONE_RECIPIENT = 800  # characters after a failed address searched for its SMTP reply


def classify(raw: bytes, recipients: Sequence[str]) -> Classification:
    """Classify one inbound mail. `recipients`: the envelope RCPT TO addresses the inbound server
    accepted (a VERP return path names the bounced message; the unsubscribe mailto address makes an
    unsubscribe). Never raises on the mail's content: bad MIME, charsets or sizes give
    `unrecognised` with a detail. Settings errors (no secret key, say) do raise."""
    verp_id = next((found for found in map(message_of, recipients) if found), None)
    to_mailto = _is_mailto(recipients)
    try:
        message = email.message_from_bytes(raw, policy=email.policy.compat32)
    except Exception as exc:  # the parser is lenient; this is for what it still cannot take
        return Classification(UNRECOGNISED, (), f"unparseable mail ({type(exc).__name__})")
    if not message.keys():
        return Classification(UNRECOGNISED, (), "no headers")
    try:
        return _Classifier(message, verp_id, to_mailto).run()
    except Exception as exc:  # a malformed part deep in the tree must not stop the inbound queue
        return Classification(UNRECOGNISED, (), f"unreadable mail ({type(exc).__name__}: {str(exc)[:100]})")


def _is_mailto(recipients: Sequence[str]) -> bool:
    try:
        address = mailto_address().lower()
    except ValueError:  # SMARTMAIL_UNSUBSCRIBE_MAILTO is not an address: nothing can be sent to it
        return False
    return any(recipient.strip().strip("<>").lower() == address for recipient in recipients)


class _Classifier:
    """One mail's checks, in order; the decoded body text is computed once, when a check needs it."""

    def __init__(self, message: Message, verp_id: str | None, to_mailto: bool) -> None:
        self.message = message
        self.verp_id = verp_id
        self.to_mailto = to_mailto
        self._text: str | None = None

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = mime_text.texts(self.message)
        return self._text

    def run(self) -> Classification:
        report_type = collapse_rfc2231_value(self.message.get_param("report-type", "") or "").lower()
        checks = (self._feedback_report, self._delivery_report)
        if report_type != "feedback-report":
            checks = (self._delivery_report, self._feedback_report)
        for check in checks:
            found = check()
            if found is not None:
                return found
        if self.to_mailto:
            return self._unsubscribe()
        signal = self._bounce_signal()
        if signal:
            # Checked before auto-replies: MTAs set Auto-Submitted on their bounces (RFC 3834 section 5).
            return self._heuristic_bounce(signal) or Classification(
                UNRECOGNISED, (), f"looks like a bounce ({signal}) but names no failed recipient"
            )
        auto = self._challenge() or self._auto_reply()
        if auto:
            return Classification(AUTO_REPLY, (), auto)
        if self.verp_id:
            # Mail to a return path that is no report, no auto-reply and no bounce by its looks: some
            # relays bounce from an ordinary address with an ordinary subject.
            return self._heuristic_bounce(None) or Classification(
                UNRECOGNISED, (), "mail to a return path that is neither a bounce nor an auto-reply"
            )
        return Classification(UNRECOGNISED, (), "not a report, bounce, unsubscribe or auto-reply")

    # --- Reports --------------------------------------------------------------------------------

    def _delivery_report(self) -> Classification | None:
        part = dsn.report_part(self.message)
        if part is None:
            return None
        statuses = dsn.recipient_statuses(part)
        if not statuses:
            return None  # no per-recipient block: let the heuristics read the text
        message_id = self.verp_id or self._returned_message_id()
        failed = [s for s in statuses if s.action.startswith("fail")]
        delayed = [s for s in statuses if s.action.startswith("delay")]
        if failed:
            findings = []
            for item in failed:
                status = effective_status(item.status, item.diagnostic)
                kind = failure_kind(status, item.diagnostic)
                findings.append(Finding(kind, "dsn", item.recipient, message_id, status, item.diagnostic))
            return Classification(BOUNCE, tuple(findings), "delivery status notification (RFC 3464)")
        if delayed:
            findings = [
                Finding(
                    Kind.SOFT_BOUNCE,
                    "dsn",
                    item.recipient,
                    message_id,
                    effective_status(item.status, item.diagnostic),
                    item.diagnostic,
                )
                for item in delayed
            ]
            return Classification(DELAYED, tuple(findings), "delivery delayed, still being retried (RFC 3464)")
        actions = ", ".join(sorted({s.action or "none" for s in statuses}))
        return Classification(UNRECOGNISED, (), f"delivery status notification without a failure (action {actions})")

    def _feedback_report(self) -> Classification | None:
        part = arf.report_part(self.message)
        if part is None:
            return None
        report = arf.read(part)
        if report.feedback_type in arf.NOT_COMPLAINTS:
            return Classification(UNRECOGNISED, (), f"feedback report of type {report.feedback_type}: not a complaint")
        returned = mime_text.returned_headers(self.message)
        message_id = None
        recipient = report.original_rcpt_to
        if returned is not None:
            # The returned message's Return-Path is our signed VERP address when the provider kept it.
            message_id = message_of(mime_text.header(returned, "Return-Path"))
            # Microsoft's JMRP names the recipient in a header of its own when it redacts To.
            recipient = recipient or arf.address_in(mime_text.header(returned, "X-HmXmrOriginalRecipient"))
            recipient = recipient or arf.address_in(mime_text.header(returned, "To"))
        if message_id is None and report.original_mail_from:
            message_id = message_of(report.original_mail_from)
        message_id = message_id or self.verp_id
        if message_id is None and returned is not None:
            message_id = mime_text.our_message_id(mime_text.header(returned, "Message-ID"))
        finding = Finding(
            Kind.COMPLAINT,
            "arf",
            recipient,
            message_id,
            feedback_type=report.feedback_type or None,
            reference=mime_text.header(self.message, "Message-ID").strip()[:400] or None,
        )
        return Classification(
            COMPLAINT, (finding,), f"feedback report (RFC 5965) from {report.user_agent or 'unknown'}"
        )

    def _returned_message_id(self) -> str | None:
        returned = mime_text.returned_headers(self.message)
        if returned is not None:
            found = mime_text.our_message_id(mime_text.header(returned, "Message-ID"))
            if found:
                return found
        return mime_text.quoted_message_id(self.text)

    # --- Unsubscribe mailto ---------------------------------------------------------------------

    def _unsubscribe(self) -> Classification:
        match = _UNSUBSCRIBE.search(mime_text.header(self.message, "Subject"))
        if match is None:
            first_line = next((line for line in self.text.splitlines() if line.strip()), "")
            match = _UNSUBSCRIBE.search(first_line)
        if match is None:
            return Classification(UNRECOGNISED, (), "mail to the unsubscribe address without a token")
        finding = Finding(Kind.UNSUBSCRIBE, "mailto", unsubscribe_token=match.group(1))
        return Classification(UNSUBSCRIBE, (finding,), "mail to the List-Unsubscribe mailto address")

    # --- Non-standard bounces -------------------------------------------------------------------

    def _bounce_signal(self) -> str | None:
        sender = mime_text.header(self.message, "From")
        for name, address in _addresses(sender):
            if address.partition("@")[0].lower() in _DAEMONS or _DAEMON_NAMES.search(name):
                return f"From: {address or name}"
        if self.message.get("X-Failed-Recipients") is not None:
            return "X-Failed-Recipients"  # Exim
        subject = mime_text.header(self.message, "Subject")
        if _BOUNCE_SUBJECT.search(subject):
            return f"Subject: {subject.strip()[:80]}"
        return None

    def _heuristic_bounce(self, signal: str | None) -> Classification | None:
        try:
            temporary, permanent = all_failures(self.message)
        except Exception:  # a detector that trips over odd input finds nothing
            temporary, permanent = frozenset(), frozenset()
        message_id = self.verp_id or self._returned_message_id()
        failed = sorted({_decoded(address) for address in permanent} - {""})
        delayed = sorted({_decoded(address) for address in temporary} - {""} - set(failed))
        if failed:
            findings = tuple(self._heuristic_finding(address, message_id, failed, delayed=False) for address in failed)
            return Classification(BOUNCE, findings, f"non-standard bounce (flufl.bounce; {signal or 'return path'})")
        if delayed:
            findings = tuple(self._heuristic_finding(address, message_id, delayed, delayed=True) for address in delayed)
            return Classification(
                DELAYED, findings, f"non-standard delay warning (flufl.bounce; {signal or 'return path'})"
            )
        if signal and message_id:
            # No address found, but the return path names the message: its SMTP reply decides.
            reply = reply_match(self.text)
            if reply is not None and reply[0][0] in "45":
                status, at = reply
                diagnostic = _about(self.text, at, ())
                kind = failure_kind(status, diagnostic)
                finding = Finding(kind, "heuristic", None, message_id, status, diagnostic or None)
                return Classification(BOUNCE, (finding,), f"non-standard bounce, no address found ({signal})")
        return None

    def _heuristic_finding(self, address: str, message_id: str | None, others: list[str], *, delayed: bool) -> Finding:
        """flufl.bounce says which addresses failed, not why: the SMTP reply quoted near the address
        does, when there is one (a 5.7.1 policy block must not suppress the address); else flufl's
        permanent means hard."""
        text = self.text
        at = text.lower().find(address)
        diagnostic = _about(text, at, [other for other in others if other != address]) if at >= 0 else ""
        status = reply_status(diagnostic)
        if delayed:
            kind = Kind.SOFT_BOUNCE
        else:
            kind = failure_kind(status, diagnostic, unknown=Kind.HARD_BOUNCE)
        return Finding(kind, "heuristic", address, message_id, status, diagnostic or None)

    # --- Auto-replies ---------------------------------------------------------------------------

    def _challenge(self) -> str | None:
        for _name, address in _addresses(mime_text.header(self.message, "From")):
            domain = address.rpartition("@")[2].lower()
            if any(domain == known or domain.endswith("." + known) for known in _CHALLENGE_DOMAINS):
                return f"challenge-response ({domain})"
        if _CHALLENGE_SUBJECT.search(mime_text.header(self.message, "Subject")) or _CHALLENGE_BODY.search(
            self.text[:4000]
        ):
            return "challenge-response"
        return None

    def _auto_reply(self) -> str | None:
        submitted = mime_text.header(self.message, "Auto-Submitted").strip().lower()
        if submitted and submitted.split(";")[0].strip() != "no":
            return f"Auto-Submitted: {submitted[:40]}"
        for name in _AUTO_HEADERS:
            if self.message.get(name) is not None:
                return name
        precedence = mime_text.header(self.message, "Precedence").strip().lower()
        if precedence in _AUTO_PRECEDENCE:
            return f"Precedence: {precedence}"
        subject = mime_text.header(self.message, "Subject")
        if _AUTO_SUBJECT.search(subject):
            return f"Subject: {subject.strip()[:80]}"
        return None


def _addresses(value: str) -> list[tuple[str, str]]:
    try:
        return getaddresses([value]) if value else []
    except Exception:
        return []


def _decoded(address: bytes) -> str:
    return address.decode("ascii", "replace").strip().strip("<>").lower()


def _about(text: str, at: int, others: Sequence[str]) -> str:
    """The words of a bounce about the recipient named at `at`: from its line to the copy of the
    original message or the next failed recipient, at most _ABOUT_ONE_RECIPIENT characters."""
    start = text.rfind("\n", 0, at) + 1
    window = text[start : start + _ABOUT_ONE_RECIPIENT]
    lowered = window.lower()
    end = len(window)
    for other in others:
        found = lowered.find(other, at - start + 1)
        if found > 0:
            end = min(end, lowered.rfind("\n", 0, found) + 1 or found)
    original = _ORIGINAL_BEGINS.search(window, 1)
    if original:
        end = min(end, original.start())
    return " ".join(window[:end].split())[:DIAGNOSTIC_MAX]
