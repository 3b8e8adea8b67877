"""Campaigns: create, schedule, launch, pause, resume, cancel, and the fan-out to their audience."""

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    # `smartmail.campaigns.create_campaign(...)`: the public API is the lifecycle module's. Imported
    # by name: `from smartmail.campaigns import lifecycle` would come back here for `lifecycle`.
    return getattr(importlib.import_module("smartmail.campaigns.lifecycle"), name)
