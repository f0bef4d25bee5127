"""The result cache in the API (docs/cache.md): a cacheable request of a tenant is answered from the stored
outputs of its earlier identical prediction, as a new prediction that completes at once, without a GPU or the
queue.

The dialect says whether the request may be cached (`wanted`: an explicit seed, and neither `cache: false` in
our inputs nor the `X-Result-Cache: off` header); the submit computes its key (`key_for`, core/result_cache.py)
and tries `answer` before it stores anything. A miss stores the key with the new prediction, which becomes the
original of later hits once its worker completes it.

An answer points at its original's objects (nothing is copied): its outputs are the original's, so it expires
with it, on the reaper's pass or the original's DELETE (core/result_cache.py, expire_with_originals), and deleting
the answer deletes nothing of the original's. It goes through the lifecycle as a run does (created, processing,
completed: the webhook trigger writes its start, output and completed events) in one transaction with its usage
record at the tenant's cache price.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from typing import Any

from fastapi import Request
from sqlalchemy import null

from api.context import AppContext
from api.infra.rows import Row
from api.services import loras
from api.services.principals import Principal
from api.services.references import Reference
from core import events, lifecycle, progress, result_cache, safety, usage
from core.queue import kick_webhooks
from core.tables import predictions as p
from core.tables import tenants
from models.klein import GenerationParams
from models.registry import ModelSpec

log = logging.getLogger(__name__)
HEADER = "x-result-cache"  # `X-Result-Cache: off` opts a request out, in every dialect
OFF = ("off", "false", "0", "no")


def wanted(request: Request, seed: int | None, asked: bool = True) -> bool:
    """Whether the request may be answered from the cache: its seed was given (a random one is never cached), and
    neither the body (`asked`: our inputs' `cache`) nor the `X-Result-Cache` header opted out."""
    header = request.headers.get(HEADER)
    return seed is not None and seed >= 0 and asked and (header is None or header.strip().lower() not in OFF)


async def key_for(
    ctx: AppContext,
    spec: ModelSpec,
    params: GenerationParams,
    references: Sequence[Reference],
    adapters: Sequence[loras.Adapter],
) -> str | None:
    """The request's cache key; None while no worker of the model has said which weights it serves, and for a
    prompt to be rewritten first (its rewrite, kept on its own row, is not part of what the cache answers with)."""
    if params.enhance != "off":
        return None
    queue = ctx.settings.queue_name
    published = [result_cache.weights_key(queue, spec.id), safety.status_key(queue, spec.id)]
    weights, checker = (_text(value) for value in await ctx.redis.mget(published))
    if not weights:
        return None
    determined = params.model_dump(mode="json") | {"loras": [a.ref.model_dump(mode="json") for a in adapters]}
    shas = [hashlib.sha256(reference.data).hexdigest() for reference in references]
    return result_cache.cache_key(spec.id, spec.distilled, weights, checker, determined, shas)


def _text(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else value or ""


async def answer(
    ctx: AppContext,
    principal: Principal,
    spec: ModelSpec,
    prediction_id: str,
    request_input: dict[str, Any],
    params: GenerationParams,
    webhook: dict[str, Any] | None,
    key: str,
    adapters: Sequence[loras.Adapter] = (),
) -> Row | None:
    """The prediction completed from the tenant's original with this key, or None if it has none to give (no
    such prediction, expired or deleted, past its retention, or the tenant opted out)."""
    started = time.perf_counter()
    params = params.model_copy(update={"loras": tuple(adapter.ref for adapter in adapters)})  # named, not stored
    stored = {"input": request_input, "params": params.model_dump(mode="json")}
    settings = ctx.settings
    async with ctx.engine.begin() as conn:
        look = result_cache.original(principal.tenant_id, key, settings.default_retention_s)
        found = (await conn.execute(look)).first()
        if found is None:
            return None
        create = lifecycle.create(
            prediction_id=prediction_id,
            tenant_id=principal.tenant_id,
            api_key_id=principal.api_key_id,
            model=spec.id,
            input=request_input,
            params=stored["params"],
        ).values(
            webhook=null() if webhook is None else webhook, cache_key=key, cached_from=found.id
        )  # SQL NULL, not JSON's
        created = (await conn.execute(create.returning(p.c.created_at))).scalar_one()
        # processing, then completed: the trigger writes the events a run writes (migrations/versions/0007)
        await conn.execute(lifecycle.claim(prediction_id, result_cache.WORKER, settings.lease_s, 1))
        line = progress.log_line(f"answered from the result cache: the outputs of {found.id}", created)
        timings = {"queue_ms": 0, "inference_ms": 0, "total_ms": round((time.perf_counter() - started) * 1000)}
        complete = lifecycle.complete(
            prediction_id, result_cache.WORKER, found.outputs, timings | {"cached": True}, [line], found.safety
        )
        bill = usage.finish_and_bill(
            complete, settings.default_cache_price_per_image, plan=tenants.c.cache_price_per_image
        )
        charges = usage.charges(stored["params"], len(found.outputs))
        finished = (await conn.execute(bill, charges)).mappings().one()
    async with ctx.redis.pipeline(transaction=False) as pipe:  # as a worker announces a completion
        pipe.publish(settings.events_channel, events.completion(prediction_id, finished))
        if webhook is not None:
            kick_webhooks(pipe, settings, prediction_id)
        try:
            await pipe.execute()
        except Exception:  # the webhook poller sends it anyway; nobody waits on this id yet
            log.warning("could not announce the cached answer %s", prediction_id, exc_info=True)
    return {**stored, **finished, "webhook": webhook}
