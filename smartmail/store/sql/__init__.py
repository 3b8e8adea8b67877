"""Statements that differ between PostgreSQL and SQLite: a module per concern, a class per dialect."""
