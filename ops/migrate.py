"""The database schema brought up to date: `alembic upgrade head` (config in pyproject.toml)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def migrate(sync_database_url: str | None = None) -> None:
    """alembic upgrade head, on the configured database or the one given."""
    from alembic import command
    from alembic.config import Config

    config = Config(toml_file=str(ROOT / "pyproject.toml"))
    if sync_database_url:
        config.set_main_option("sqlalchemy.url", sync_database_url)
    command.upgrade(config, "head")
