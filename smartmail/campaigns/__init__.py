"""Campaigns: create, schedule, launch, pause, resume, cancel, and the fan-out to their audience."""
