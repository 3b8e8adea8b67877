"""Celery tasks by job: thin adapters that take ids and call one service function."""
