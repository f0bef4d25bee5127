"""Database engines: async (asyncpg) for the API, sync (psycopg) for workers and tools."""

from __future__ import annotations

from sqlalchemy import Engine, create_engine
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from core.settings import Settings


def make_async_engine(settings: Settings) -> AsyncEngine:
    return create_async_engine(settings.async_database_url, pool_size=10, max_overflow=20, pool_pre_ping=True)


def make_sync_engine(settings: Settings, pool_size: int = 2) -> Engine:
    return create_engine(settings.sync_database_url, pool_size=pool_size, pool_pre_ping=True)
