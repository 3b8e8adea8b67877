"""SmartMail: self-hosted email sending on Celery, Redis and SMTP. `smartmail.send(...)` queues an email."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"
__all__ = [
    "InvalidMessage",
    "SendResult",
    "campaigns",
    "contacts",
    "flush",
    "imports",
    "segments",
    "send",
    "send_many",
    "status",
    "track",
]

# Public name -> the module that defines it. Lazy, so `import smartmail` stays cheap and does not
# read settings until an API is used.
_LAZY = {
    "send": "producer.sending",
    "send_many": "producer.sending",
    "SendResult": "producer.sending",
    "InvalidMessage": "producer.sending",
    "status": "producer.status",
    "track": "audience.contacts",
    "flush": "producer.handoff",
}
# Public module name -> where it lives (`smartmail.contacts.create_contact(...)`).
_MODULES = {
    "contacts": "audience.contacts",
    "imports": "audience.imports",
    "segments": "audience.segments",
    "exports": "audience.exports",
    "campaigns": "campaigns.lifecycle",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"smartmail.{_LAZY[name]}"), name)
    if name in _MODULES:
        return importlib.import_module(f"smartmail.{_MODULES[name]}")
    raise AttributeError(name)
