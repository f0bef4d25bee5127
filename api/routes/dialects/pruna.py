"""The Pruna predictions dialect (shared/seeds/000_*): submit, poll, Try-Sync, cancel, delete.

Status words follow the official `pruna-client`: starting, processing, succeeded, failed, canceled.
"""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from api.context import AppContext, context, get_ctx, public_base_url
from api.errors import TOO_DEEP, Invalid, validation_error
from api.infra import metrics
from api.infra.jsonresponse import JSON
from api.routes.dialects import replicate
from api.routes.dialects.common import seed_or_random, served_model
from api.routes.openapi_errors import errors
from api.services import enhance, live, loras, predictions, references, result_cache, webhooks
from api.services.auth import Authenticated, authenticate, authenticate_submit
from api.services.principals import Principal
from api.services.rate_limit import Slot
from core.lifecycle import Status
from models.klein import KleinInput
from models.registry import known_ids
from views.pruna import view

router = APIRouter(tags=["pruna"], responses=errors(401, 429, 503))

_REQUEST_SCHEMA = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["input"],
                "properties": {
                    "input": KleinInput.model_json_schema(),
                    "webhook": {"type": "string", "format": "uri", "description": "POST events here (docs/events.md)"},
                    "webhook_events_filter": {
                        "type": "array",
                        "items": {"type": "string", "enum": ["start", "output", "completed"]},
                        "default": ["completed"],
                    },
                },
            }
        }
    },
}


_PREDICTION = {"application/json": {"schema": {"type": "object"}}}
# The two hottest routes read their headers and authenticate in their bodies: as FastAPI parameters and
# dependencies they cost each request a pass of dependency solving apiece (docs/performance.md).
_SUBMIT_HEADERS = [
    {"name": "Model", "in": "header", "required": False, "schema": {"type": "string", "examples": ["flux-klein-4b"]}},
    {"name": "Try-Sync", "in": "header", "required": False, "schema": {"type": "string", "examples": ["true"]}},
    {"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string"}},
]


@router.post(
    "/v1/predictions",
    openapi_extra={"requestBody": _REQUEST_SCHEMA, "parameters": _SUBMIT_HEADERS},
    responses={
        200: {"description": "Finished within the Try-Sync wait", "content": _PREDICTION},
        201: {"description": "Accepted: queued or running; poll get_url", "content": _PREDICTION},
        **errors(404, 409, 413, 422),
    },
)
@metrics.submit_route
async def create_prediction(request: Request) -> Response:
    principal, slot = await authenticate_submit(request)  # the slot costs no round trip of its own
    try:
        return await _create(request, principal, slot)
    except Exception:
        await slot.give_back()  # unless the prediction was stored and keeps it
        raise


async def _create(request: Request, principal: Principal, slot: Slot) -> Response:
    ctx = context(request)
    body = await _json_object(request)
    if "version" in body:  # Replicate's body (api/routes/dialects/replicate.py), answered in its shape
        return await replicate.create_versioned(request, principal, slot, body)
    model = request.headers.get("model")
    if not model:
        raise Invalid("missing `Model` header naming the model, e.g. `Model: flux-klein-4b`", known_models=known_ids())
    spec = served_model(model, ctx.settings)
    raw_input = body.get("input")
    if not isinstance(raw_input, dict):
        raise Invalid(
            "invalid request: input: must be a JSON object with the model's parameters",
            detail=[{"loc": ["input"], "msg": "must be an object", "type": "object_type"}],
        )
    try:
        validated = spec.input_model.model_validate(raw_input)
    except ValidationError as exc:
        raise validation_error(exc.errors(), prefix=("input",)) from None
    request_input, idempotency_key = validated.model_dump(), request.headers.get("idempotency-key")
    async with predictions.in_flight(ctx, principal, spec, request_input, idempotency_key, slot):
        refs = await references.resolve(ctx, principal, request, validated.images, "input.images")
        adapters = await loras.resolve(ctx, principal, request, spec.id, validated.loras, "input.loras")
        params = validated.to_params(
            seed_or_random(validated.seed), (refs[0].info.width, refs[0].info.height) if refs else None
        )
        enhance.admit(ctx.settings, params)  # enhance_prompt when the enhancer is off: 501 (docs/enhancer.md)
        base_url = public_base_url(request, ctx.settings)
        webhook = await webhooks.accept(
            ctx, "pruna", base_url, body.get("webhook"), "webhook", body.get("webhook_events_filter")
        )
        wait_s = ctx.settings.try_sync_timeout_s if _truthy(request.headers.get("try-sync")) else 0.0
        row = await predictions.submit(
            ctx,
            principal,
            spec,
            request_input,
            params,
            refs,
            wait_s,
            idempotency_key,
            slot,
            webhook,
            adapters,
            disable_asked_by="input.disable_safety_checker" if validated.disable_safety_checker else None,
            deadline=validated.deadline(),
            cache=result_cache.wanted(request, validated.seed, validated.cache),
        )
    if Status(row["status"]).terminal:  # Try-Sync's answer, as the status endpoint will show it
        return JSON(view(row, base_url, live.of_final(row)), status_code=200)
    return JSON(view(row, base_url), status_code=201)


@router.get(
    "/v1/predictions/status/{prediction_id}",
    responses={200: {"description": "The prediction", "content": _PREDICTION}, **errors(404, 422)},
)
async def prediction_status(prediction_id: str, request: Request) -> JSONResponse:
    principal = await authenticate(request)
    ctx = context(request)
    row = await predictions.fetch_or_404(ctx, principal, prediction_id)
    return JSON(view(row, public_base_url(request, ctx.settings), await live.extras(ctx, row)))


@router.post(
    "/v1/predictions/{prediction_id}/cancel",
    responses={
        200: {"description": "The prediction, canceled unless it had finished", "content": _PREDICTION},
        **errors(404, 422),
    },
)
async def cancel_prediction(prediction_id: str, request: Request) -> Response:
    if replicate.speaks_replicate(request):  # Replicate's client: its prediction object, its errors
        return await replicate.cancel(request, prediction_id)
    principal = await authenticate(request)
    ctx = context(request)
    row = await predictions.cancel(ctx, principal, prediction_id)
    return JSON(view(row, public_base_url(request, ctx.settings), await live.extras(ctx, row)))


@router.delete(
    "/v1/predictions/{prediction_id}",
    status_code=204,
    response_class=Response,
    responses={
        204: {"description": "Its outputs and references are deleted (canceled first if unfinished); usage stays"},
        **errors(404, 422),
    },
)
async def delete_prediction(
    prediction_id: str, principal: Authenticated, ctx: Annotated[AppContext, Depends(get_ctx)]
) -> Response:
    await predictions.fetch_or_404(ctx, principal, prediction_id)  # another tenant's: 404
    await predictions.delete(ctx, principal.tenant_id, prediction_id)
    return Response(status_code=204)


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc):  # orjson parses at most 1,024 levels deep
            raise Invalid(TOO_DEEP) from None
        raise Invalid("invalid request: body is not valid JSON") from None
    if not isinstance(body, dict):
        raise Invalid('invalid request: body must be a JSON object like {"input": {...}}')
    return body


def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().lower() in ("true", "1", "yes")
