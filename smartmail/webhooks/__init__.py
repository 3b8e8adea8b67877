"""Outbound webhooks: events POSTed to subscribers, signed per the Standard Webhooks spec, retried, SSRF-guarded.

Receivers import only `smartmail.webhooks.verify` (and `WebhookVerificationError`): it needs no settings.
"""

from smartmail.webhooks.signatures import WebhookVerificationError, verify

__all__ = ["WebhookVerificationError", "verify"]
