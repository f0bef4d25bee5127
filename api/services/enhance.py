"""The API's side of the prompt enhancer (docs/enhancer.md): store and queue a standalone job, wait for it (Try-Sync),
read and cancel it; refuse enhancement when it is off; say in GET /v1/models what the enhancer is."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from api.context import AppContext
from api.errors import CONTENT_POLICY, ContentRefused, NotEnabled, NotFound
from api.infra.waiter import Completion
from api.services import safety
from api.services.principals import Principal
from core import enhance_jobs, logs, prompt_policy
from core.ids import new_id
from core.lifecycle import Status
from core.queue import model_queue, task_message
from core.settings import Settings
from core.tables import enhancements
from models.klein import GenerationParams
from models.tiny import MARKER as TINY_MARKER
from views.common import STATUS_WORDS

Row = dict[str, Any]
OFF = "prompt enhancement is off on this deployment (KLEIN_ENHANCER=off)"


def status(settings: Settings) -> dict[str, Any]:
    """What GET /v1/models says of the enhancer."""
    if settings.enhancer == "off":
        return {"enabled": False, "backend": "off", "reason": OFF}
    view: dict[str, Any] = {"enabled": True, "backend": settings.enhancer, "endpoint": "POST /v1/prompts/enhance"}
    if settings.enhancer == "local":
        view["model"] = "the model's own Qwen3 text encoder"
        if (Path(settings.model_path) / TINY_MARKER).exists():
            view["warning"] = "tiny random-weights Qwen3: its rewrites are noise words"
    else:
        view["model"] = settings.enhancer_model
    return view


def require_enabled(settings: Settings) -> None:
    if settings.enhancer == "off":
        raise NotEnabled(OFF, enhancer="off")


def admit(settings: Settings, params: GenerationParams) -> None:
    """A prediction asking for `enhance_prompt: true` is refused (501, nothing stored) when enhancement is off;
    `"best_effort"` is accepted and generated from its original prompt (its logs say why)."""
    if params.enhance == "strict":
        require_enabled(settings)


def screen(ctx: AppContext, principal: Principal, prompt: str) -> None:
    """The original prompt passes the prompt policy (the rewrite is checked again on the worker)."""
    if prompt_policy.blocked(prompt, safety.operator_terms(ctx.settings.prompt_blocklist) + principal.blocked_terms):
        raise ContentRefused(safety.PROMPT_REFUSED, code=CONTENT_POLICY)


async def submit(ctx: AppContext, principal: Principal, model: str, job_input: dict[str, Any], wait_s: float) -> Row:
    """Store the job and queue it on the model's workers (its Celery queue, `klein.enhance`), optionally waiting
    for it to finish: a waiter is registered before the task is queued, so no completion slips by."""
    job_id = new_id()
    logs.bind(enhancement_id=job_id)
    create = enhance_jobs.create(job_id, principal.tenant_id, principal.api_key_id, model, job_input)
    async with ctx.engine.begin() as conn:
        row = dict((await conn.execute(create)).mappings().one())
    key, message = task_message(model_queue(ctx.settings.queue_name, model), job_id, 0, enhance_jobs.ENHANCE_TASK)
    if wait_s <= 0:
        await ctx.redis.lpush(key, message)
        return row
    with ctx.waiter.watch(job_id, principal.tenant_id) as finished:
        await ctx.redis.lpush(key, message)
        return await _wait(ctx, principal, job_id, finished, wait_s) or row


async def _wait(ctx: AppContext, principal: Principal, job_id: str, finished: Completion, wait_s: float) -> Row | None:
    deadline = time.monotonic() + wait_s
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            await asyncio.wait_for(finished.wait(), remaining)
        except TimeoutError:
            break
        finished.clear()
        row = await fetch(ctx, principal, job_id)
        if row is not None and Status(row["status"]).terminal:
            return row
    return await fetch(ctx, principal, job_id)


async def fetch(ctx: AppContext, principal: Principal, job_id: str) -> Row | None:
    query = enhancements.select().where(enhancements.c.id == job_id, enhancements.c.tenant_id == principal.tenant_id)
    async with ctx.engine.connect() as conn:
        row = (await conn.execute(query)).mappings().first()
    return None if row is None else dict(row)


async def fetch_or_404(ctx: AppContext, principal: Principal, job_id: str) -> Row:
    row = await fetch(ctx, principal, job_id)
    if row is None:
        raise NotFound(f"enhancement {job_id!r} not found")
    return row


async def cancel(ctx: AppContext, principal: Principal, job_id: str) -> Row:
    """Cancel a queued or running job (its worker stops at the next token); a finished one is returned as it is."""
    async with ctx.engine.begin() as conn:
        canceled = (await conn.execute(enhance_jobs.cancel(job_id, principal.tenant_id))).mappings().first()
    if canceled is None:
        return await fetch_or_404(ctx, principal, job_id)
    await ctx.redis.publish(ctx.settings.events_channel, job_id)
    return dict(canceled)


def view(row: Row, base_url: str) -> dict[str, Any]:
    """A job as clients read it."""
    status = row["status"]
    body: dict[str, Any] = {
        "id": row["id"],
        "status": STATUS_WORDS[status],
        "prompt": row["output"],
        "original": row["input"]["prompt"],
        "style": row["input"].get("style"),
        "model": row["enhancer"],
        "timings": row["timings"],
        "error": row["error"],
        "get_url": f"{base_url}/v1/prompts/enhance/{row['id']}",
        "created_at": row["created_at"],
        "completed_at": row["completed_at"],
    }
    if not Status(status).terminal:
        body["cancel_url"] = f"{base_url}/v1/prompts/enhance/{row['id']}/cancel"
    return body
