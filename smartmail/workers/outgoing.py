"""What every transport takes (Outgoing) and the reply of a message held back before it was sent."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from smartmail.workers.outcomes import Reply
from smartmail.workers.policy import Site


class Outgoing(NamedTuple):
    """A message for Transport.send and send_window. `site` (traffic shaping) selects the
    connection pool and its limits; None means no limits. `ready`, when given, is called once the
    message is about to go (a session is open): if it returns False the message is not sent and
    the reply has stage HELD. `key` (the message id) is what the write-ahead mark of its
    transmission names (smtp_window.Transmit)."""

    sender: str
    recipient: str
    data: bytes
    site: Site | None = None
    ready: Callable[[], bool] | None = None
    key: str | None = None


# The reply stage of a message not sent because `ready()` said no (traffic shaping held it back).
HELD = "held"
HELD_REPLY = Reply(None, "held back before MAIL FROM", HELD)
# The reply stage of a message whose content was not sent because its write-ahead mark could not
# be made (workers/ownership.py): not an attempt, tried again shortly.
NOT_SENT = "unsent"
NOT_SENT_REPLY = Reply(None, "not transmitted: the write-ahead mark could not be made", NOT_SENT)
