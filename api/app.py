"""The API tier: `uvicorn api.app:create_app --factory`. Never imports torch."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.context import AppContext
from api.errors import install_error_handlers
from api.infra.body_limit import BodySizeLimit
from api.infra.hosts import TrustedHosts
from api.infra.observe import Observe
from api.infra.pg import make_pool
from api.infra.rows import Rows
from api.infra.waiter import CompletionWaiter, Notices
from api.routes import (
    account,
    admin,
    batches,
    delivery,
    files,
    listing,
    meta,
    operations,
    stream,
    web,
    webhooks,
    workers,
)
from api.routes import enhance as prompts
from api.routes import metrics as scrape
from api.routes.dialects import bfl, fal, generate, oneminute, openai, pruna, replicate, wavespeed
from api.services.principals import KeyCache
from api.services.rate_limit import Limiter, RateLimitHeaders
from core import logs, tracing
from core.db import make_async_engine
from core.redis_connection import aclose_async_client, async_client
from core.settings import Settings, get_settings
from core.storage import make_s3_client

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    logs.configure(settings.log_format, settings.log_level, settings.secret_values())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_async_engine(settings)
        pg = await make_pool(settings)
        # Every request's commands, and the waiter's one subscription, on a pool of connections to the primary.
        redis = async_client(settings)
        s3 = await asyncio.to_thread(make_s3_client, settings)
        keys = KeyCache(settings.key_cache_ttl_s)
        progress = Notices()  # the event streams' (api/routes/stream.py)
        also: dict[str, Callable[[str], None]] = {
            settings.keys_channel: keys.clear,
            settings.progress_channel: progress.notify,
        }
        waiter = CompletionWaiter(redis, settings.events_channel, also=also)
        await waiter.start()
        limiter = Limiter(redis, settings.queue_name)
        rows = Rows(pg, concurrency=settings.db_batches)
        decodes = asyncio.Semaphore(settings.max_concurrent_decodes)
        app.state.ctx = AppContext(settings, engine, pg, rows, redis, s3, waiter, limiter, keys, decodes, progress)
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
        docs_url=None,  # /docs (and /redoc) are api/routes/web.py's: no third-party script, the pages' policy
        redoc_url=None,
    )
    install_error_handlers(app)
    app.add_middleware(RateLimitHeaders)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    # The Host header decides the URLs we hand out (api/context.py): only hosts we were told about.
    app.add_middleware(TrustedHosts, allowed_hosts=settings.trusted_hosts)
    app.add_middleware(
        Observe, access_log=settings.access_log
    )  # outermost: every answer gets its request id, log context and metrics
    app.add_route("/metrics", scrape.endpoint, include_in_schema=False)
    app.mount("/static/vendor", web.vendor, name="vendor")  # before /static, which would take its paths
    app.mount("/static", web.assets, name="static")
    routers = (  # replicate's /v1/models/{owner}/{name} before meta's /v1/models/{id:path}; bfl's /v1/{model} last
        *(pruna, replicate, generate, wavespeed, oneminute, openai, fal, listing, stream, delivery, files, webhooks),
        batches,
        *(account, admin, operations, workers, prompts, meta, web, bfl),
    )
    app.router.routes.extend(batches.native.routes)  # POST /v1/batches, before bfl's /v1/{model} takes it
    for module in routers:
        # A router's prefix, dependencies, tags and responses are already on each of its routes, which join
        # the app's directly: include_router would add a nested dispatch to every request (≈ 15 µs,
        # docs/performance.md). The OpenAPI document comes out the same.
        app.router.routes.extend(module.router.routes)
    tracing.configure("klein-api", app=app, s3=True)  # only with OTEL_EXPORTER_OTLP_ENDPOINT set
    return app
