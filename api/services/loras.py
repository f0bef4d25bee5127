"""LoRA adapters named by a request: read (our uploads from storage, other URLs through the SSRF-safe fetcher,
at most KLEIN_MAX_LORA_BYTES), checked (safetensors only; a LoRA's layout; the layers and sizes of the model's
transformer as its workers published them), stored once by content hash, referenced by the prediction."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Sequence

import orjson
from botocore.exceptions import ClientError
from fastapi import Request

from api.context import AppContext
from api.errors import Invalid
from api.infra.objects import put_object
from api.services.principals import Principal
from api.services.references import own_hosts, read_url
from core import lora
from core.netguard import FetchError
from models.klein import LoraInput, LoraRef

TARGETS_TTL_S = 30.0
_targets: dict[str, tuple[float, dict[str, tuple[int, int]] | None]] = {}  # model → (read at, its LoRA targets)


async def resolve(
    ctx: AppContext, principal: Principal, request: Request, model: str, loras: Sequence[LoraInput], field: str
) -> tuple[LoraRef, ...]:
    """Each LoRA read, checked and stored; a bad one is a 422 naming `field[i].path`."""
    if not loras:
        return ()
    settings = ctx.settings
    if len(loras) > settings.max_loras:
        raise Invalid(f"invalid request: {field}: at most {settings.max_loras} LoRAs, got {len(loras)}")
    ours, fits = own_hosts(request, ctx), await targets(ctx, model)

    async def one(index: int, given: LoraInput) -> LoraRef:
        where = f"{field}[{index}].path"
        try:
            data = await read_url(ctx, principal, given.path, ours, settings.max_lora_bytes)
            layers = lora.pairs(lora.read_header(data))
        except (lora.LoraError, FetchError) as exc:
            raise Invalid(f"invalid request: {where}: {exc}") from None
        problems = lora.misfits(layers, fits) if fits else []
        if problems:
            shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
            raise Invalid(f"invalid request: {where}: this LoRA does not fit {model}: {shown}")
        ref = LoraRef(sha256=hashlib.sha256(data).hexdigest(), scale=given.scale)
        await _store(ctx, ref.key, data)
        return ref

    return tuple(await asyncio.gather(*(one(i, given) for i, given in enumerate(loras))))


async def targets(ctx: AppContext, model: str) -> dict[str, tuple[int, int]] | None:
    """The layers a LoRA of `model` may name, as its workers published them at start (worker/runtime.py); None
    until one has (then the worker checks before it runs)."""
    cached = _targets.get(model)
    if cached is None or time.monotonic() - cached[0] >= TARGETS_TTL_S:
        raw = await ctx.redis.get(lora.targets_key(ctx.settings.queue_name, model))
        table = {name: (shape[0], shape[1]) for name, shape in orjson.loads(raw).items()} if raw else None
        cached = _targets[model] = (time.monotonic(), table)
    return cached[1]


async def _store(ctx: AppContext, key: str, data: bytes) -> None:
    """Stored once: the same bytes from any request or tenant are the same object."""
    try:
        await asyncio.to_thread(ctx.s3.head_object, Bucket=ctx.settings.s3_bucket, Key=key)
    except ClientError:
        await put_object(ctx, key, data, lora.CONTENT_TYPE)
