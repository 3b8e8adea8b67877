"""Statements that differ between PostgreSQL and SQLite: one module per concern, one class per dialect behind a small interface."""
