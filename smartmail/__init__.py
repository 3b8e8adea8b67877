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


# Contacts, lists, imports and segments (issue 4).
__all__ += ["track", "contacts", "imports", "segments"]
_AUDIENCE_MODULES = ("contacts", "imports", "segments", "exports")


def _audience_getattr(name: str):
    import importlib

    if name == "track":
        from smartmail.contacts import track

        return track
    if name in _AUDIENCE_MODULES:
        return importlib.import_module(f"smartmail.{name}")
    return _base_getattr(name)


_base_getattr = __getattr__
__getattr__ = _audience_getattr  # noqa: F811
