"""What the API process holds for its lifetime, created in the app's lifespan."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg
from fastapi import Request
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from api.infra.rows import Rows
from api.infra.waiter import CompletionWaiter, Notices
from core.settings import Settings

if TYPE_CHECKING:  # built by api/app.py; the context only carries them (it imports no service)
    from mypy_boto3_s3 import S3Client

    from api.services.principals import KeyCache
    from api.services.rate_limit import Limiter


@dataclass(frozen=True)
class AppContext:
    settings: Settings
    engine: AsyncEngine  # SQLAlchemy: transactions and everything off the hot path
    pg: asyncpg.Pool  # the hot single statements (api/infra/pg.py)
    rows: Rows  # the predictions' insert and read, on `pg`
    redis: Redis  # core.redis_connection.async_client
    s3: S3Client
    waiter: CompletionWaiter
    limiter: Limiter
    keys: KeyCache
    decodes: asyncio.Semaphore  # input images decoded and LoRAs checked at once (api/routes/files.py)
    progress: Notices  # woken by workers' progress entries, for the event streams


def context(request: Request) -> AppContext:
    ctx: AppContext = request.app.state.ctx
    return ctx


async def get_ctx(request: Request) -> AppContext:  # async: a plain def would cost a thread-pool hop
    return context(request)


def public_base_url(request: Request, settings: Settings) -> str:
    """Absolute base for URLs we hand out: the configured public URL, else the request's own."""
    if settings.public_base_url:
        return settings.public_base_url.rstrip("/")
    # Starlette builds request.base_url from these anew for every request: remember the few seen.
    scope = request.scope
    root = scope.get("app_root_path", scope.get("root_path", ""))
    seen = (scope["scheme"], request.headers.get("host"), scope.get("server"), root)
    base = _base_urls.get(seen)
    if base is None:
        if len(_base_urls) >= 256:  # the Host header is the client's: bound what it can make us keep
            _base_urls.clear()
        base = _base_urls[seen] = str(request.base_url).rstrip("/")
    return base


_base_urls: dict[tuple[Any, ...], str] = {}
