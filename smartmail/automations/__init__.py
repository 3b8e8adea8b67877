"""Automations: workflows (triggers, steps, goals), their enrolments advanced by beat, and the scheduler's clock."""
