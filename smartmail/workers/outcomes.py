"""SMTP reply classification (RFC 5321, RFC 3463) and the retry schedule: the one place deciding a fate."""

from __future__ import annotations

import enum
import random
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta

_ENHANCED = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})\b")


@dataclass(frozen=True)
class Reply:
    """What the relay answered. `code` is None when there was no reply at all (refused, reset, timeout)."""

    code: int | None
    text: str
    # Which step it answered: "mail", "rcpt", "data" (the reply to the final dot), or None when
    # not known. A lost connection at "data" is ambiguous: the relay may have taken the message.
    stage: str | None = field(default=None, compare=False)

    @property
    def enhanced(self) -> str | None:
        """The RFC 3463 enhanced status code that leads the reply text, e.g. `5.1.1`."""
        match = _ENHANCED.match(self.text)
        return ".".join(match.groups()) if match else None

    def __str__(self) -> str:
        return f"{self.code} {self.text}" if self.code is not None else self.text


class Verdict(str, enum.Enum):
    SENT = "sent"
    DEFERRED = "deferred"
    FAILED = "failed"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Outcome:
    verdict: Verdict
    suppress: bool = False  # a hard bounce: the address itself is bad
    policy: bool = False  # a 5.7.x policy rejection: about the sender or content, not the address


# RFC 3463 X.1.x subjects about the *recipient* address. 5.1.7 and 5.1.8 are about the sender's
# address, so they are not the recipient's fault and must not suppress it.
_SENDER_SUBJECTS = {"7", "8"}


def classify(reply: Reply) -> Outcome:
    """Map a reply to sent / deferred / failed.

    - No reply (connection refused, reset, timeout): temporary, deferred.
    - 2xx: accepted (RFC 5321 section 4.2.1).
    - 4xx: transient negative completion, deferred (RFC 5321 section 4.2.1).
    - 552: treated as temporary, as RFC 5321 section 4.5.3.1.10 asks for "too many recipients"
      (GNU Mailman does the same).
    - 5xx: permanent, failed; with enhanced status 5.1.x about the recipient (RFC 3463 section 3.2),
      a hard bounce that suppresses the address; 5.7.x is a policy rejection.
    - Anything else (1xx/3xx where a final reply belongs) is a protocol error: deferred.
    - The connection lost after the message body was sent: unknown, as the relay may have
      accepted it (RFC 1047); re-sending could duplicate it.
    - Rejections at MAIL FROM, and 530 (authentication required, RFC 4954) anywhere, are about
      our sender or relay set-up, not the recipient: deferred, so fixing the set-up delivers them.
    """
    if reply.code is None:
        return Outcome(Verdict.UNKNOWN if reply.stage == "data" else Verdict.DEFERRED)
    klass = reply.code // 100
    if klass == 2:
        return Outcome(Verdict.SENT)
    # 552 after DATA (5.3.4, message too big) is final; at RCPT it means "too many recipients".
    if klass == 4 or (reply.code == 552 and reply.stage != "data"):
        return Outcome(Verdict.DEFERRED)
    if klass == 5 and (reply.stage == "mail" or reply.code == 530):
        return Outcome(Verdict.DEFERRED)
    if klass == 5:
        enhanced = reply.enhanced
        if enhanced and enhanced.startswith("4."):
            return Outcome(Verdict.DEFERRED)  # the enhanced code says transient; trust the finer signal
        subject, detail = enhanced.split(".")[1:] if enhanced else (None, None)
        hard = subject == "1" and detail not in _SENDER_SUBJECTS
        return Outcome(Verdict.FAILED, suppress=hard, policy=subject == "7")
    return Outcome(Verdict.DEFERRED)


@dataclass(frozen=True)
class RetrySchedule:
    """Exponential backoff with jitter, capped per interval and by the message's total age."""

    first_interval: float = 60.0
    backoff_factor: float = 2.0
    max_interval: float = 3600.0
    jitter: float = 0.2
    max_age: float = 3 * 86400.0

    @classmethod
    def from_settings(cls, settings) -> RetrySchedule:
        """SMARTMAIL_RETRY_*: the schedule with shaping off, and of any site whose policy sets none."""
        return cls(
            settings.retry_first_interval,
            settings.retry_backoff_factor,
            settings.retry_max_interval,
            settings.retry_jitter,
            settings.retry_max_age,
        )

    def next_attempt(
        self, attempts: int, created_at: datetime, now: datetime, rng: random.Random | None = None
    ) -> datetime | None:
        """When to try again after `attempts` tries, or None once the message is too old to retry."""
        try:
            grown = self.first_interval * self.backoff_factor ** max(attempts - 1, 0)
        except OverflowError:  # float power overflows long before a sane attempt count ends
            grown = self.max_interval
        base = min(grown, self.max_interval)
        # Jitter spreads retries out so a relay that came back is not hit by every deferred message at once.
        spread = (rng or random).uniform(-self.jitter, self.jitter)
        due = now + timedelta(seconds=max(base * (1 + spread), 0.0))
        if due > created_at + timedelta(seconds=self.max_age):
            return None
        return due
