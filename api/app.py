"""The API tier: `uvicorn api.app:create_app --factory`. Never imports torch."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.middleware.trustedhost import TrustedHostMiddleware

from api.context import AppContext
from api.errors import install_error_handlers
from api.infra.body_limit import BodySizeLimit
from api.infra.pg import make_pool
from api.infra.rows import Rows
from api.infra.waiter import CompletionWaiter
from api.routes import account, admin, delivery, files, meta
from api.routes.dialects import generate, oneminute, openai, pruna, wavespeed
from api.services.principals import KeyCache
from api.services.rate_limit import Limiter, RateLimitHeaders
from core.db import make_async_engine
from core.redis_connection import aclose_async_client, async_client
from core.settings import Settings, get_settings
from core.storage import make_s3_client

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_async_engine(settings)
        pg = await make_pool(settings)
        # Every request's commands, and the waiter's one subscription, on a pool of connections to the primary.
        redis = async_client(settings)
        s3 = await asyncio.to_thread(make_s3_client, settings)
        keys = KeyCache(settings.key_cache_ttl_s)
        waiter = CompletionWaiter(redis, settings.events_channel, also={settings.keys_channel: keys.clear})
        await waiter.start()
        limiter = Limiter(redis, settings.queue_name)
        rows = Rows(pg, concurrency=settings.db_batches)
        decodes = asyncio.Semaphore(settings.max_concurrent_decodes)
        app.state.ctx = AppContext(settings, engine, pg, rows, redis, s3, waiter, limiter, keys, decodes)
        # Everything allocated so far lives as long as the process. Left to the collector, its full
        # collections walk all of it again and again: under load they took a fifth of the API's CPU and
        # most of its p99 latency (docs/performance.md). Frozen, they only walk what requests allocate;
        # start-up's own garbage is collected first rather than kept for good.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            await waiter.stop()
            await aclose_async_client(redis)
            await pg.close()
            await engine.dispose()

    app = FastAPI(
        title="klein-serve",
        summary="Self-hosted FLUX.2 [klein] 4B image generation",
        version="0.1.0",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(RateLimitHeaders)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    # The Host header decides the URLs we hand out (api/context.py): only hosts we were told about.
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=settings.trusted_hosts, www_redirect=False)
    for module in (pruna, generate, wavespeed, oneminute, openai, delivery, files, account, admin, meta):
        # A router's prefix, dependencies, tags and responses are already on each of its routes, which join
        # the app's directly: include_router would add a nested dispatch to every request (≈ 15 µs,
        # docs/performance.md). The OpenAPI document comes out the same.
        app.router.routes.extend(module.router.routes)
    return app
