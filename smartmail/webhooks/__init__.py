"""Outbound webhooks: events POSTed to subscribers' endpoints, signed per the Standard Webhooks spec,
retried, SSRF-guarded."""
