"""SmartMail: self-hosted email sending on Celery, Redis and SMTP. `smartmail.send(...)` queues an email."""
from __future__ import annotations

import importlib

__version__ = "0.1.0"
__all__ = ["InvalidMessage", "SendResult", "campaigns", "contacts", "flush", "imports", "segments", "send",
           "send_many", "status", "track"]

# Public name -> the module that defines it. Lazy, so `import smartmail` stays cheap and does not
# read settings until an API is used.
_LAZY = {"send": "sending", "send_many": "sending", "SendResult": "sending", "InvalidMessage": "sending",
         "status": "message_status", "track": "contacts", "flush": "workers.handoff"}
_MODULES = {"contacts", "imports", "segments", "exports", "campaigns"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"smartmail.{_LAZY[name]}"), name)
    if name in _MODULES:
        return importlib.import_module(f"smartmail.{name}")
    raise AttributeError(name)
