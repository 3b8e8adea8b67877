"""Campaigns: create, schedule, launch, pause, resume, cancel, and the fan-out to their audience."""

from typing import Any


def __getattr__(name: str) -> Any:
    # `smartmail.campaigns.create_campaign(...)`: the public API is the lifecycle module's.
    from smartmail.campaigns import lifecycle

    return getattr(lifecycle, name)
