"""The GPU workers under /admin/v1 (admin key): each one's model, state and last announcement, and its drain
(core/workers.py). `klein workers` and `klein drain-worker` do the same from the command line."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends

from api.context import AppContext, get_ctx
from api.errors import Conflict, NotFound
from api.routes.admin import require_admin
from api.routes.openapi_errors import errors
from api.services import fleet
from core import workers

router = APIRouter(
    prefix="/admin/v1", tags=["admin"], dependencies=[Depends(require_admin)], responses=errors(401, 404, 429, 503)
)
Ctx = Annotated[AppContext, Depends(get_ctx)]


@router.get("/workers")
async def list_workers(ctx: Ctx) -> dict[str, Any]:
    """Every GPU worker heard of lately: model, Celery node, state (idle, busy, draining; lost: silent for
    30 s), whether it runs a prediction now, and how long ago it announced itself."""
    return {"data": [worker.view() for worker in await fleet.worker_list(ctx)]}


@router.post("/workers/{name}/drain", status_code=202, responses=errors(409))
async def drain_worker(ctx: Ctx, name: str) -> dict[str, Any]:
    """Drain a worker (by Celery node name, as `celery inspect` shows it, or id): it takes no new predictions,
    finishes those it holds, and is counted as draining, not live. It stays drained until it restarts."""
    worker = workers.named(await fleet.worker_list(ctx), name)
    if worker is None:
        raise NotFound(f"no GPU worker named {name!r} has announced itself lately (GET /admin/v1/workers)")
    if worker.state == "lost":
        raise Conflict(
            f"worker {name!r} has not announced itself for {worker.view()['seen_s_ago']} s: nothing to drain"
        )
    async with ctx.redis.pipeline(transaction=False) as pipe:
        workers.mark_draining(pipe, ctx.settings, worker)
        await pipe.execute()
    await asyncio.to_thread(workers.stop_consuming, ctx.settings, worker.queue, worker.node)
    return worker.view() | {"state": "draining"}
