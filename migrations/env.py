"""Alembic environment: the URL comes from core.settings (KLEIN_DATABASE_URL)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from core.settings import get_settings
from core.tables import metadata

config = context.config
url = config.get_main_option("sqlalchemy.url") or get_settings().sync_database_url


def run() -> None:
    if context.is_offline_mode():
        context.configure(url=url, target_metadata=metadata, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(url)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=metadata)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run()
