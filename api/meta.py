"""Models catalogue and health endpoints."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.context import AppContext, get_ctx
from api.errors import ApiError
from models.registry import MODELS, known_ids, resolve

router = APIRouter(tags=["meta"])


@router.get("/v1/models")
async def list_models() -> dict[str, Any]:
    return {"object": "list", "data": [spec.describe() for spec in MODELS]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str) -> dict[str, Any]:
    spec = resolve(model_id)
    if spec is None:
        raise ApiError(404, f"unknown model {model_id!r}", known_models=known_ids())
    return spec.describe()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(ctx: Annotated[AppContext, Depends(get_ctx)]) -> JSONResponse:
    """Readiness: every dependency answers within a second."""

    async def database() -> None:
        async with ctx.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def redis() -> None:
        await ctx.redis.ping()

    async def storage() -> None:
        await asyncio.to_thread(ctx.s3.head_bucket, Bucket=ctx.settings.s3_bucket)

    async def check(probe: Any) -> str:
        try:
            await asyncio.wait_for(probe(), 1.0)
        except Exception as exc:
            return f"error: {type(exc).__name__}"
        return "ok"

    names = ("database", "redis", "storage")
    results = await asyncio.gather(*(check(p) for p in (database, redis, storage)))
    checks = dict(zip(names, results, strict=True))
    checks["events"] = "ok" if ctx.waiter.subscribed.is_set() else "error: not subscribed"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks}, status_code=200 if ready else 503
    )
