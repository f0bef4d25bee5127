"""Database engines: async (asyncpg) for the API, sync (psycopg) for workers and tools."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from core.settings import Settings


def make_async_engine(settings: Settings) -> AsyncEngine:
    # A fixed pool: a connection opened per request (overflow) costs far more than waiting for a free
    # one. Dead connections are dropped on first use (SQLAlchemy invalidates the pool on a disconnect
    # error), so no ping round trip is spent on every checkout.
    # SQLAlchemy's asyncpg dialect prepares every statement and caches it per connection; without prepared
    # statements asyncpg runs each as an unnamed one instead (both caches off, as their docs say for PgBouncer).
    connect_args = (
        {} if settings.db_prepared_statements else {"prepared_statement_cache_size": 0, "statement_cache_size": 0}
    )
    return create_async_engine(
        settings.async_database_url, pool_size=settings.db_pool_size, max_overflow=0, connect_args=connect_args
    )


def make_sync_engine(settings: Settings, pool_size: int = 2, pre_ping: bool = True, durable: bool = True) -> Engine:
    """`durable=False`: its sessions commit without waiting for the WAL to reach disk (`synchronous_commit
    = off`), for writes a database crash may take back without harm. The next durable commit on the
    server flushes them too: WAL is written in order, so a durable commit is never kept while an
    earlier asynchronous one it saw is lost."""
    connect_args: dict[str, Any] = {} if durable else {"options": "-c synchronous_commit=off"}
    if not settings.db_prepared_statements:
        connect_args["prepare_threshold"] = None  # psycopg never prepares (by default after 5 executions)
    return create_engine(
        settings.sync_database_url, pool_size=pool_size, pool_pre_ping=pre_ping, connect_args=connect_args
    )
