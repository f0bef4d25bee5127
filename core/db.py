"""Database engines: async (asyncpg) for the API, sync (psycopg) for workers and tools."""

from __future__ import annotations

from sqlalchemy import Engine, create_engine
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from core.settings import Settings


def make_async_engine(settings: Settings) -> AsyncEngine:
    # A fixed pool: a connection opened per request (overflow) costs far more than waiting for a free
    # one. Dead connections are dropped on first use (SQLAlchemy invalidates the pool on a disconnect
    # error), so no ping round trip is spent on every checkout.
    return create_async_engine(settings.async_database_url, pool_size=settings.db_pool_size, max_overflow=0)


def make_sync_engine(settings: Settings, pool_size: int = 2, pre_ping: bool = True) -> Engine:
    return create_engine(settings.sync_database_url, pool_size=pool_size, pool_pre_ping=pre_ping)
