"""The Pruna predictions dialect (shared/seeds/000_*): submit, poll, Try-Sync.

Status words follow the official `pruna-client`: starting, processing, succeeded, failed, canceled.
"""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from api.context import AppContext, context, get_ctx, public_base_url
from api.errors import TOO_DEEP, Invalid, validation_error
from api.infra.jsonresponse import JSON
from api.routes.delivery import output_urls
from api.routes.dialects.common import lookup_model, seed_or_random
from api.routes.openapi_errors import errors
from api.services import predictions, references
from api.services.auth import Authenticated, authenticate, authenticate_submit
from api.services.principals import Principal
from api.services.rate_limit import Slot
from core.lifecycle import Status
from models.klein import KleinInput
from models.registry import known_ids

router = APIRouter(tags=["pruna"], responses=errors(401, 429, 503))

STATUS_WORDS = {
    Status.CREATED: "starting",
    Status.PROCESSING: "processing",
    Status.COMPLETED: "succeeded",
    Status.FAILED: "failed",
    Status.CANCELED: "canceled",
}

_REQUEST_SCHEMA = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["input"],
                "properties": {"input": KleinInput.model_json_schema()},
            }
        }
    },
}


def view(row: predictions.Row, base_url: str) -> dict[str, Any]:
    """The Pruna prediction body. Timestamps stay datetimes: orjson writes them as `isoformat()` does, in C."""
    status = row["status"]  # a Status is its str, so the str looks it up
    body: dict[str, Any] = {
        "id": row["id"],
        "model": row["model"],
        "input": row["input"],
        "status": STATUS_WORDS[status],
        "get_url": f"{base_url}/v1/predictions/status/{row['id']}",
        "seed": row["params"]["seed"],
        "created_at": row["created_at"],
        "started_at": row["started_at"],
        "completed_at": row["completed_at"],
        "timings": row["timings"],
        "error": row["error"],
    }
    if status == Status.COMPLETED:
        urls = output_urls(base_url, row)
        body["generation_url"] = urls[0]
        body["generation_urls"] = urls
    return body


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
async def create_prediction(request: Request) -> JSONResponse:
    principal, slot = await authenticate_submit(request)  # the slot costs no round trip of its own
    try:
        return await _create(request, principal, slot)
    except Exception:
        await slot.give_back()  # unless the prediction was stored and keeps it
        raise


async def _create(request: Request, principal: Principal, slot: Slot) -> JSONResponse:
    ctx = context(request)
    model = request.headers.get("model")
    if not model:
        raise Invalid("missing `Model` header naming the model, e.g. `Model: flux-klein-4b`", known_models=known_ids())
    spec = lookup_model(model)
    body = await _json_object(request)
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
    refs = await references.resolve(ctx, principal, request, validated.images, "input.images")
    params = validated.to_params(
        seed_or_random(validated.seed), (refs[0].info.width, refs[0].info.height) if refs else None
    )
    wait_s = ctx.settings.try_sync_timeout_s if _truthy(request.headers.get("try-sync")) else 0.0
    idempotency_key = request.headers.get("idempotency-key")
    row = await predictions.submit(
        ctx, principal, spec, validated.model_dump(), params, refs, wait_s, idempotency_key, slot
    )
    finished = Status(row["status"]).terminal
    return JSON(view(row, public_base_url(request, ctx.settings)), status_code=200 if finished else 201)


@router.get(
    "/v1/predictions/status/{prediction_id}",
    responses={200: {"description": "The prediction", "content": _PREDICTION}, **errors(404, 422)},
)
async def prediction_status(prediction_id: str, request: Request) -> JSONResponse:
    principal = await authenticate(request)
    ctx = context(request)
    row = await predictions.fetch_or_404(ctx, principal, prediction_id)
    return JSON(view(row, public_base_url(request, ctx.settings)))


@router.post(
    "/v1/predictions/{prediction_id}/cancel",
    responses={
        200: {"description": "The prediction, canceled unless it had finished", "content": _PREDICTION},
        **errors(404, 422),
    },
)
async def cancel_prediction(
    prediction_id: str, request: Request, principal: Authenticated, ctx: Annotated[AppContext, Depends(get_ctx)]
) -> JSONResponse:
    row = await predictions.cancel(ctx, principal, prediction_id)
    return JSON(view(row, public_base_url(request, ctx.settings)))


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
