"""SmartMail: self-hosted email sending on Celery, Redis and SMTP. `smartmail.send(...)` queues an email."""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["send", "send_many", "status", "SendResult", "InvalidMessage"]


def __getattr__(name: str):
    # Lazy, so `import smartmail` stays cheap and does not read settings until an API is used.
    if name in ("send", "send_many", "SendResult", "InvalidMessage"):
        from smartmail import sending

        return getattr(sending, name)
    if name == "status":
        from smartmail.message_status import status

        return status
    raise AttributeError(name)
