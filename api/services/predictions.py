"""The dialect-neutral prediction service: create + enqueue, wait, read.

Dialect routers translate their request shapes into `GenerationParams` and call these.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import orjson

from api.context import AppContext
from api.errors import Conflict, Forbidden, NotFound, Unavailable
from api.infra import metrics
from api.infra.objects import put_object
from api.infra.rows import NewPrediction, Row
from api.infra.waiter import Completion
from api.services import idempotency, loras, retention, safety
from api.services.auth import Principal
from api.services.rate_limit import Slot
from api.services.references import Reference
from core import lifecycle, logs
from core.deadlines import Deadline
from core.ids import new_id
from core.queue import kick_webhooks, model_queue, queued_key, task_message
from core.quota import LOWEST_PRIORITY, queue_priority
from core.safety import Effective
from core.storage import output_key
from models.klein import GenerationParams
from models.registry import ModelSpec

log = logging.getLogger(__name__)


@asynccontextmanager
async def in_flight(
    ctx: AppContext,
    principal: Principal,
    spec: ModelSpec,
    request_input: dict[str, Any],
    idempotency_key: str | None = None,
    slot: Slot | None = None,
) -> AsyncIterator[Slot]:
    """The submit's in-flight slot (`slot`, taken with the rate-limit hit, else taken now), required before the
    request's LoRAs and reference images are fetched: a tenant at its cap is answered 429 at no download. A retry
    of a request stored before (its Idempotency-Key and input) passes; `submit` answers it with the original.
    Given back on every way out but a stored prediction, which keeps it."""
    require_active(principal)
    slot = slot or await ctx.limiter.take_slot(principal.tenant_id, principal.max_in_flight)
    try:
        if not slot.granted:
            fingerprint = idempotency.fingerprint(spec.id, request_input)
            if not (idempotency_key and await idempotency.replays(ctx, principal, idempotency_key, fingerprint)):
                slot.require()
        yield slot
    finally:
        await slot.give_back()


def require_active(principal: Principal) -> None:
    """A suspended tenant submits nothing (its reads, and the work it has in flight, go on)."""
    if principal.suspended:
        raise Forbidden("this account is suspended: new predictions are refused; existing ones can still be read")


async def submit(
    ctx: AppContext,
    principal: Principal,
    spec: ModelSpec,
    request_input: dict[str, Any],
    params: GenerationParams,
    references: Sequence[Reference] = (),
    wait_s: float = 0.0,
    idempotency_key: str | None = None,
    slot: Slot | None = None,
    webhook: dict[str, Any] | None = None,
    adapters: Sequence[loras.Adapter] = (),
    disable_asked_by: str | None = None,
    disable_means: Effective = "off",
    last_in_queue: bool = False,
    deadline: Deadline | None = None,
) -> Row:
    """Store the prediction (and its reference images and LoRAs, only now that the request was accepted),
    enqueue it after the commit, optionally wait.

    `slot`: the in-flight slot the request took with its rate-limit hit (auth.authenticate_submit), which
    the prediction keeps once stored; without one, a slot is taken here. `webhook`: from
    api.services.webhooks.accept. `disable_asked_by`: the dialect's flag that turned the safety checker off, if
    the request did (api/services/safety.py); the prompt policy is checked here, before anything is stored.
    `last_in_queue`: behind everything the tenant's backlog would run before (never ahead of it). `deadline`: when
    it is canceled unless started (or finished) by then (core/deadlines.py)."""
    try:
        require_active(principal)
        params = safety.screen(ctx, principal, params, disable_asked_by, disable_means)
        return await _submit(
            ctx,
            principal,
            spec,
            request_input,
            params,
            references,
            wait_s,
            idempotency_key,
            slot,
            webhook,
            adapters,
            last_in_queue,
            deadline,
        )
    finally:  # stored or refused, the LoRAs' spooled files go now (loras.store closes those it stored)
        for adapter in adapters:
            adapter.close()


async def _submit(
    ctx: AppContext,
    principal: Principal,
    spec: ModelSpec,
    request_input: dict[str, Any],
    params: GenerationParams,
    references: Sequence[Reference],
    wait_s: float,
    idempotency_key: str | None,
    slot: Slot | None,
    webhook: dict[str, Any] | None,
    adapters: Sequence[loras.Adapter],
    last_in_queue: bool,
    deadline: Deadline | None,
) -> Row:
    prediction_id = new_id()
    logs.bind(prediction_id=prediction_id)
    reservation: idempotency.Reservation | None = None
    if idempotency_key is not None:
        fingerprint = idempotency.fingerprint(spec.id, request_input)
        while reservation is None:
            held = await idempotency.reserve(ctx, principal, idempotency_key, fingerprint, prediction_id)
            if isinstance(held, idempotency.Reservation):
                reservation = held
            elif (original := await _replay(ctx, principal, idempotency_key, held, wait_s)) is not None:
                if slot is not None:
                    await slot.give_back()  # the original holds its own
                return original
            # else its holder died before storing it and its lease lapsed: this request takes the key over
    try:
        async with reservation.leased() if reservation else contextlib.nullcontext():
            slot = slot or await ctx.limiter.take_slot(principal.tenant_id, principal.max_in_flight)
            slot.require()
            try:
                if references:
                    keys = await _store_references(ctx, principal, prediction_id, references)
                    params = params.model_copy(update={"reference_keys": keys})
                if adapters:
                    params = params.model_copy(update={"loras": await loras.store(ctx, principal, adapters)})
                priority = LOWEST_PRIORITY if last_in_queue else queue_priority(slot.held)
                row = await _insert(
                    ctx, principal, spec, prediction_id, request_input, params, webhook, priority, deadline
                )
            except Exception:
                await slot.give_back()
                raise
            slot.keep()
    except Exception:
        if reservation is not None:
            await reservation.release()
        raise
    if reservation is not None:
        await reservation.keep()

    if wait_s <= 0:
        await _enqueue_or_fail(ctx, principal, prediction_id, spec.id, priority)
        return row
    with ctx.waiter.watch(prediction_id, principal.tenant_id) as finished:  # before enqueueing: no race
        await _enqueue_or_fail(ctx, principal, prediction_id, spec.id, priority)
        if ctx.waiter.waiting_for(principal.tenant_id) <= ctx.settings.max_sync_waits_per_tenant:
            with metrics.SYNC_WAITERS.track_inprogress():
                return await _wait(ctx, principal, prediction_id, finished, wait_s, stored=row) or row
        metrics.sync_waited("not_waited")
    return row


async def _enqueue_or_fail(
    ctx: AppContext, principal: Principal, prediction_id: str, model: str, priority: int
) -> None:
    """Enqueue, or fail the stored prediction (unless a worker already took it) and answer 503."""
    try:
        await enqueue(ctx, prediction_id, model, priority)
    except Exception as exc:
        log.error("enqueue of %s failed: %s", prediction_id, exc)
        async with ctx.engine.begin() as conn:
            failed = await conn.execute(lifecycle.fail_unclaimed(prediction_id, "could not be queued"))
        if failed.first() is not None:
            await ctx.limiter.release_slot(principal.tenant_id)
        raise Unavailable("queue unavailable, try again shortly", retry_after=1, id=prediction_id) from exc


async def enqueue(ctx: AppContext, prediction_id: str, model: str, priority: int) -> None:
    """core.queue.enqueue on the API's async Redis: the sweeper's mark and the task on its model's queue, one
    round trip."""
    queue = model_queue(ctx.settings.queue_name, model)
    key, message = task_message(queue, prediction_id, priority, request_id=logs.current("request_id"))
    async with ctx.redis.pipeline(transaction=False) as pipe:
        pipe.sadd(queued_key(ctx.settings), prediction_id)
        pipe.lpush(key, message)
        await pipe.execute()


async def _store_references(
    ctx: AppContext, principal: Principal, prediction_id: str, references: Sequence[Reference]
) -> tuple[str, ...]:
    """Inputs live with the prediction in storage, so a redelivered task sees exactly the same images."""
    keys = tuple(
        output_key(principal.tenant_id, prediction_id, f"input_{i}.{ref.info.extension}")
        for i, ref in enumerate(references)
    )
    await asyncio.gather(
        *(put_object(ctx, key, ref.data, ref.info.content_type) for key, ref in zip(keys, references, strict=True))
    )
    return keys


async def _insert(
    ctx: AppContext,
    principal: Principal,
    spec: ModelSpec,
    prediction_id: str,
    request_input: dict[str, Any],
    params: GenerationParams,
    webhook: dict[str, Any] | None,
    priority: int,
    deadline: Deadline | None = None,
) -> Row:
    stored = {"input": request_input, "params": params.model_dump(mode="json")}
    new = NewPrediction(
        prediction_id,
        principal.tenant_id,
        principal.api_key_id,
        spec.id,
        orjson.dumps(request_input).decode(),
        orjson.dumps(stored["params"]).decode(),
        None if webhook is None else orjson.dumps(webhook).decode(),
        str(priority),
        *(deadline.columns() if deadline else (None, None)),
    )
    return await ctx.rows.insert(new) | stored  # what was just encoded need not be decoded again


async def _replay(
    ctx: AppContext, principal: Principal, idempotency_key: str, prediction_id: str, wait_s: float
) -> Row | None:
    """The prediction an earlier request with the same Idempotency-Key created (it may still be storing it); None
    if that request's lease lapsed without storing it (its API process died)."""
    deadline = time.monotonic() + ctx.settings.idempotency_lease_s + 5
    while (row := await fetch(ctx, principal, prediction_id)) is None:
        if not await idempotency.names(ctx, principal, idempotency_key, prediction_id):
            if (row := await fetch(ctx, principal, prediction_id)) is not None:  # stored just as it let go
                break
            return None
        if time.monotonic() > deadline:
            raise Conflict("a request with this Idempotency-Key is still being accepted; retry shortly")
        await asyncio.sleep(0.05)
    if wait_s > 0 and not lifecycle.Status(row["status"]).terminal:
        with ctx.waiter.watch(prediction_id, principal.tenant_id) as finished, metrics.SYNC_WAITERS.track_inprogress():
            return await _wait(ctx, principal, prediction_id, finished, wait_s) or row
    return row


async def _wait(
    ctx: AppContext,
    principal: Principal,
    prediction_id: str,
    finished: Completion,
    wait_s: float,
    stored: Row | None = None,
) -> Row | None:
    """The row once it is final, or as it is after `wait_s`. With the row as `stored` (the insert's, with
    input and params), a worker's completion event answers without reading the row back."""
    deadline = time.monotonic() + wait_s
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            await asyncio.wait_for(finished.wait(), remaining)
        except TimeoutError:
            break
        finished.clear()
        final = finished.final_row
        if stored is not None and final is not None and final["tenant_id"] == principal.tenant_id:
            metrics.sync_waited("answered")
            return {**stored, **final}
        row = await fetch(ctx, principal, prediction_id)
        if row is not None and lifecycle.Status(row["status"]).terminal:
            metrics.sync_waited("answered")
            return row
    row = await fetch(ctx, principal, prediction_id)
    metrics.sync_waited("answered" if row is not None and lifecycle.Status(row["status"]).terminal else "pending")
    return row


async def fetch(ctx: AppContext, principal: Principal, prediction_id: str) -> Row | None:
    """One primary-key read, scoped to the caller's tenant (another tenant's id reads as absent). A queued
    prediction read past its start deadline is canceled first, so its status says so even with no worker or
    sweeper running (core/deadlines.py)."""
    row = await ctx.rows.read((prediction_id, principal.tenant_id))
    if row is not None and _start_deadline_passed(row):
        return await _expire(ctx, row)
    return row


def _start_deadline_passed(row: Row) -> bool:
    start_by = row.get("start_deadline_at")
    return row["status"] == lifecycle.Status.CREATED and start_by is not None and start_by <= datetime.now(UTC)


async def _expire(ctx: AppContext, row: Row) -> Row:
    """The queued `row` canceled for its deadline, announced as a cancel; as it is now if that did not apply (a
    worker took it just in time, by the database's clock)."""
    async with ctx.engine.begin() as conn:
        expired = (await conn.execute(lifecycle.expire_unstarted(row["id"]))).mappings().first()
    if expired is None:
        return await ctx.rows.read((row["id"], row["tenant_id"])) or row
    metrics.deadline_canceled()
    await _announce_cancel(ctx, row["tenant_id"], expired)
    return {**row, **expired}


async def fetch_or_404(ctx: AppContext, principal: Principal, prediction_id: str) -> Row:
    logs.bind(prediction_id=prediction_id)
    row = await fetch(ctx, principal, prediction_id)
    if row is None:
        raise NotFound(f"prediction {prediction_id!r} not found")
    return row


async def cancel(ctx: AppContext, principal: Principal, prediction_id: str) -> Row:
    """Cancel a queued or running prediction; a finished one is returned unchanged."""
    row = await cancel_of(ctx, principal.tenant_id, prediction_id)
    return row if row is not None else await fetch_or_404(ctx, principal, prediction_id)


async def cancel_of(ctx: AppContext, tenant_id: str, prediction_id: str) -> Row | None:
    """The tenant's prediction canceled if it was queued or running (its slot given back, the sweeper's mark
    cleared, the cancel announced); None if it was not (finished, absent, or another tenant's)."""
    async with ctx.engine.begin() as conn:
        canceled = (await conn.execute(lifecycle.cancel(prediction_id, tenant_id))).mappings().first()
    if canceled is None:
        return None
    metrics.canceled(running=canceled["worker_id"] is not None)  # a queued one has no worker (yet, or again)
    await _announce_cancel(ctx, tenant_id, canceled)
    return dict(canceled)


async def _announce_cancel(ctx: AppContext, tenant_id: str, canceled: Mapping[Any, Any]) -> None:
    """After a cancel: the tenant's slot given back, out of the sweeper's set (a running prediction's worker would
    do that, unless it died), announced, and its webhook's `completed` event (written with the cancel) sent."""
    prediction_id = canceled["id"]
    await ctx.limiter.release_slot(tenant_id)
    async with ctx.redis.pipeline(transaction=False) as pipe:
        pipe.srem(queued_key(ctx.settings), prediction_id)
        pipe.publish(ctx.settings.events_channel, prediction_id)
        if canceled["webhook"] is not None:
            kick_webhooks(pipe, ctx.settings, prediction_id)
        await pipe.execute()


async def delete(ctx: AppContext, tenant_id: str, prediction_id: str) -> None:
    """Cancel the tenant's prediction if unfinished, then delete its outputs and references (usage stays)."""
    await cancel_of(ctx, tenant_id, prediction_id)
    await retention.expire(ctx, tenant_id, prediction_id)
