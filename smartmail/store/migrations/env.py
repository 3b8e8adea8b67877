"""Alembic environment: migrates the database named by SMARTMAIL_DATABASE_URL (or the config's URL)."""

from alembic import context

from smartmail.store.engine import make_engine
from smartmail.store.models import Base

config = context.config


def run_migrations() -> None:
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        from smartmail.config import get_settings

        url = get_settings().database_url
    engine = make_engine(url)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=connection.dialect.name == "sqlite",  # SQLite ALTER TABLE needs batch mode
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations()
