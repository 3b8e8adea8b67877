"""What a bounce, complaint or unsubscribe report says about one recipient, whatever its source."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Kind(str, enum.Enum):
    HARD_BOUNCE = "hard_bounce"  # permanent: the address does not exist or refuses mail for good
    SOFT_BOUNCE = "soft_bounce"  # temporary or not about the address: full mailbox, policy, a delay
    COMPLAINT = "complaint"  # the recipient marked a message as spam (ARF, provider feedback loop)
    UNSUBSCRIBE = "unsubscribe"  # a mail to the List-Unsubscribe mailto address
    DELIVERED = "delivered"  # a provider's delivery notification: nothing to change

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Finding:
    """One recipient's outcome found in a report. `message_id` is SmartMail's message id when the
    report names it (VERP return path, the returned Message-ID, a provider's headers); `recipient`
    is the address the report is about (normalized lower-case), when it says."""

    kind: Kind
    source: str  # dsn | arf | ses | mailto | heuristic (flufl.bounce)
    recipient: str | None = None
    message_id: str | None = None
    status: str | None = None  # RFC 3463 enhanced status code, e.g. "5.1.1"
    diagnostic: str | None = None  # the remote server's words (Diagnostic-Code), capped
    feedback_type: str | None = None  # ARF Feedback-Type (abuse, fraud, …) or the provider's subtype
    reference: str | None = None  # the provider's own report id, for de-duplication without a message id
    unsubscribe_token: str | None = None  # the token of a mailto unsubscribe's subject
    # False for a provider's report of an earlier event (its own suppression list): it suppresses,
    # it is not this campaign's bounce or complaint.
    counts_for_campaign: bool = True
