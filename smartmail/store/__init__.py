"""The database: engine and sessions, models, ids, Alembic migrations, and the SQL that differs by dialect."""
