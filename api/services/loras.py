"""LoRA adapters named by a request: read (our uploads from storage, other URLs through the SSRF-safe fetcher,
at most KLEIN_MAX_LORA_BYTES decoded), checked off the event loop (safetensors only; a well-formed LoRA with
finite weights; the layers and sizes of the model's transformer as its workers published them), and stored only
once the whole request is accepted (`store`, called by predictions.submit right before the insert): once by
content hash, counted against each tenant naming it, deleted by the reaper once unused (core/retention.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import orjson
from botocore.exceptions import ClientError
from fastapi import Request
from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert

from api.context import AppContext
from api.errors import Invalid
from api.infra.objects import put_object
from api.routes.files import inspect_lora
from api.services.principals import Principal
from api.services.references import own_hosts, read_url
from api.services.retention import duration
from core import lora
from core.netguard import FetchError
from core.tables import lora_uses, loras, tenants
from models.klein import LoraInput, LoraRef

TARGETS_TTL_S = 30.0
_targets: dict[str, tuple[float, dict[str, tuple[int, int]] | None]] = {}  # model → (read at, its LoRA targets)


@dataclass(frozen=True)
class Adapter:
    """A LoRA a request named, checked and hashed; not stored until `store`."""

    ref: LoraRef
    data: bytes
    field: str  # where the request named it: `input.loras[0].path`


async def resolve(
    ctx: AppContext, principal: Principal, request: Request, model: str, given: Sequence[LoraInput], field: str
) -> tuple[Adapter, ...]:
    """Each LoRA read and checked; a bad one is a 422 naming `field[i].path`. Nothing is stored here."""
    if not given:
        return ()
    settings = ctx.settings
    if len(given) > settings.max_loras:
        raise Invalid(f"invalid request: {field}: at most {settings.max_loras} LoRAs, got {len(given)}")
    ours, fits = own_hosts(request, ctx), await targets(ctx, model)

    async def one(index: int, adapter: LoraInput) -> Adapter:
        where = f"{field}[{index}].path"
        try:
            data = await read_url(ctx, principal, adapter.path, ours, settings.max_lora_bytes)
            layers, sha256 = await inspect_lora(ctx, data)
        except (lora.LoraError, FetchError) as exc:
            problem = str(exc)
        else:
            problem = ""
        if problem:  # raised out here: an exception raised while handling another keeps `data` until a GC pass
            raise Invalid(f"invalid request: {where}: {problem}")
        problems = lora.misfits(layers, fits) if fits else []
        if problems:
            shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
            raise Invalid(f"invalid request: {where}: this LoRA does not fit {model}: {shown}")
        return Adapter(LoraRef(sha256=sha256, scale=adapter.scale), data, where)

    return tuple(await asyncio.gather(*(one(i, adapter) for i, adapter in enumerate(given))))


async def targets(ctx: AppContext, model: str) -> dict[str, tuple[int, int]] | None:
    """The layers a LoRA of `model` may name, as its workers published them at start (worker/runtime.py); None
    until one has (then the worker checks before it runs)."""
    cached = _targets.get(model)
    if cached is None or time.monotonic() - cached[0] >= TARGETS_TTL_S:
        raw = await ctx.redis.get(lora.targets_key(ctx.settings.queue_name, model))
        table = {name: (shape[0], shape[1]) for name, shape in orjson.loads(raw).items()} if raw else None
        cached = _targets[model] = (time.monotonic(), table)
    return cached[1]


async def store(ctx: AppContext, principal: Principal, adapters: Sequence[Adapter]) -> tuple[LoraRef, ...]:
    """Count the adapters as used by the tenant now (within its KLEIN_MAX_TENANT_LORA_BYTES, else a 422), then
    store each object unless storage has it. The rows come first: the reaper deletes only objects whose row is
    older than KLEIN_LORA_RETENTION_S, so it cannot take one from under this request."""
    if not adapters:
        return ()
    tenant_id, settings = principal.tenant_id, ctx.settings
    unique = {adapter.ref.sha256: adapter for adapter in adapters}
    async with ctx.engine.begin() as conn:
        # A tenant's LoRAs are counted one request at a time (the row lock), so two cannot both squeeze in.
        await conn.execute(select(tenants.c.id).where(tenants.c.id == tenant_id).with_for_update(key_share=True))
        held = select(func.coalesce(func.sum(loras.c.bytes), 0)).select_from(lora_uses.join(loras))
        used = (await conn.execute(held.where(lora_uses.c.tenant_id == tenant_id))).scalar_one()
        named = lora_uses.c.tenant_id == tenant_id, lora_uses.c.sha256.in_(unique)
        known = set((await conn.execute(select(lora_uses.c.sha256).where(*named))).scalars())
        new = [adapter for sha256, adapter in unique.items() if sha256 not in known]
        if new and used + sum(len(adapter.data) for adapter in new) > settings.max_tenant_lora_bytes:
            raise Invalid(
                f"invalid request: {new[0].field}: this account's stored LoRAs would exceed "
                f"{settings.max_tenant_lora_bytes} bytes ({used} stored); a LoRA is deleted "
                f"{duration(settings.lora_retention_s)} after a request last named it"
            )
        ordered = sorted(unique)  # rows locked in one order by every request
        rows = [{"sha256": sha256, "bytes": len(unique[sha256].data)} for sha256 in ordered]
        touched = {"last_used_at": func.now()}
        upsert = insert(loras).values(rows).on_conflict_do_update(index_elements=[loras.c.sha256], set_=touched)
        await conn.execute(upsert)
        uses = insert(lora_uses).values([{"tenant_id": tenant_id, "sha256": sha256} for sha256 in ordered])
        keys = [lora_uses.c.tenant_id, lora_uses.c.sha256]
        await conn.execute(uses.on_conflict_do_update(index_elements=keys, set_=touched))
    await asyncio.gather(*(_put_once(ctx, adapter) for adapter in unique.values()))
    return tuple(adapter.ref for adapter in adapters)


async def _put_once(ctx: AppContext, adapter: Adapter) -> None:
    """Stored once: the same bytes from any request or tenant are the same object."""
    try:
        await asyncio.to_thread(ctx.s3.head_object, Bucket=ctx.settings.s3_bucket, Key=adapter.ref.key)
    except ClientError:
        await put_object(ctx, adapter.ref.key, adapter.data, lora.CONTENT_TYPE)
