"""Batch jobs (docs/batch.md): OpenAI's Batch API (`POST /v1/batches` with an `input_file_id`, list, retrieve,
cancel, `GET /v1/files/{id}/content`) in OpenAI's error shape, and our native `POST /v1/batches` (a list of the
model's inputs, in the platform's error shape). The work is api/services/batches.py and core/batches.py."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from sqlalchemy import RowMapping
from starlette.datastructures import UploadFile

from api.context import AppContext, get_ctx, public_base_url
from api.errors import BadRequest, Invalid, ServiceError, answered, dialect_route, validation_error
from api.routes.delivery import outputs_base64
from api.routes.dialects.common import seed_or_random, served_model
from api.routes.dialects.openai import ImagesRequest, _openai_error
from api.routes.openapi_errors import OpenAIError, errors
from api.services import batches, safety, webhooks
from api.services.auth import Authenticated, Principal
from api.services.batches import ENDPOINT, MAX_CUSTOM_ID, MAX_INPUTS, Line, line_error
from views import pruna
from views.common import signed_output_urls

router = APIRouter(
    tags=["batches"], route_class=dialect_route(_openai_error), responses=errors(401, 429, 503, shape=OpenAIError)
)
native = APIRouter(tags=["batches"], responses=errors(401, 429, 503))  # POST /v1/batches: its own shapes
Ctx = Annotated[AppContext, Depends(get_ctx)]


async def upload(request: Request, ctx: AppContext, principal: Principal, file: UploadFile) -> Response:
    """`POST /v1/files` with `purpose=batch` (api/routes/files.py hands it here): a batch's input file, answered
    in OpenAI's shapes."""

    async def store(_: Request) -> Response:
        return JSONResponse(batches.file_object(await batches.store_input(ctx, principal, file)), status_code=201)

    return await answered(request, _openai_error, store)


_BATCH = {"application/json": {"schema": {"type": "object", "description": "OpenAI's batch object (docs/batch.md)"}}}


@native.post(
    "/v1/batches",
    status_code=201,
    response_class=Response,
    responses={
        200: {"description": "The batch, created from an input file (OpenAI's body)", "content": _BATCH},
        201: {"description": "The batch, created from a list of inputs (the native body)", "content": _BATCH},
        **errors(400, 403, 404, 413, 422),
    },
)
async def create_batch(request: Request, principal: Authenticated, ctx: Ctx) -> Response:
    """OpenAI's body (`input_file_id`, `endpoint`, `completion_window`, `metadata`), or the native one:
    `{"inputs": [<the model's input>, …], "webhook", "metadata", "completion_window"}` with the `Model` header."""
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        body = None
    if isinstance(body, dict) and "input_file_id" in body:

        async def create(_: Request) -> Response:
            return JSONResponse(await _create_openai(ctx, principal, body), status_code=200)

        return await answered(request, _openai_error, create)
    if not isinstance(body, dict):
        raise Invalid("invalid request: body: a JSON object with `inputs` (or OpenAI's `input_file_id`)")
    spec = served_model(request.headers.get("model") or "flux-klein-4b", ctx.settings)
    created = await _create_native(ctx, principal, spec, body, public_base_url(request, ctx.settings))
    return JSONResponse(created, status_code=201)


@router.get("/v1/batches", responses=errors(422, shape=OpenAIError))
async def list_batches(
    request: Request,
    principal: Authenticated,
    ctx: Ctx,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    return await batches.listing(ctx, principal, after, limit, public_base_url(request, ctx.settings))


@router.get("/v1/batches/{batch_id}", responses=errors(404, 422, shape=OpenAIError))
async def retrieve_batch(batch_id: str, request: Request, principal: Authenticated, ctx: Ctx) -> dict[str, Any]:
    return await batches.read(ctx, principal, batch_id, public_base_url(request, ctx.settings))


@router.post("/v1/batches/{batch_id}/cancel", responses=errors(404, 422, shape=OpenAIError))
async def cancel_batch(batch_id: str, request: Request, principal: Authenticated, ctx: Ctx) -> dict[str, Any]:
    return await batches.cancel(ctx, principal, batch_id, public_base_url(request, ctx.settings))


@router.get("/v1/files/{file_id}/content", response_class=Response, responses=errors(404, 422, shape=OpenAIError))
async def file_content(file_id: str, request: Request, principal: Authenticated, ctx: Ctx) -> Response:
    """A file's content: an upload as stored; a batch's output or error file as JSONL, rendered now."""
    base_url = public_base_url(request, ctx.settings)

    async def result(batch: RowMapping, row: dict[str, Any]) -> dict[str, Any]:
        return await _result(ctx, batch, row, base_url)

    chunks = await batches.file_content(ctx, principal, file_id, result)
    return StreamingResponse(chunks, media_type="application/jsonl")


async def _create_openai(ctx: AppContext, principal: Principal, body: dict[str, Any]) -> dict[str, Any]:
    """From a `purpose=batch` file, each line checked as the images route checks its body: a bad one fails alone."""
    if body.get("endpoint") != ENDPOINT:
        raise BadRequest(f"invalid request: endpoint: only {ENDPOINT} is served here")
    window, metadata = batches.window(ctx, body.get("completion_window")), batches.metadata(body.get("metadata"))
    text = await batches.input_text(ctx, principal, body.get("input_file_id"))
    lines = await asyncio.to_thread(_parse_openai, ctx, principal, text)  # 50,000 lines take a core seconds
    values = {"dialect": "openai", "endpoint": ENDPOINT, "input_file_id": body["input_file_id"], "metadata": metadata}
    return await batches.create(ctx, principal, lines, window, values)


def _parse_openai(ctx: AppContext, principal: Principal, text: str) -> list[Line]:
    lines: list[Line] = []
    seen: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            item = orjson.loads(raw)
        except orjson.JSONDecodeError:
            item = None
        if not isinstance(item, dict):
            lines.append(line_error(number, "", BadRequest(f"invalid request: line {number}: not a JSON object")))
            continue
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID:
            message = f"invalid request: custom_id: a string of 1–{MAX_CUSTOM_ID} characters is required"
            lines.append(line_error(number, str(custom_id or "")[:MAX_CUSTOM_ID], BadRequest(message), "custom_id"))
            continue
        if custom_id in seen:
            message = f"invalid request: custom_id: {custom_id!r} is used by an earlier line; each must be unique"
            lines.append(line_error(number, custom_id, BadRequest(message), "custom_id"))
            continue
        seen.add(custom_id)
        try:
            lines.append(_openai_line(ctx, principal, number, custom_id, item))
        except ServiceError as exc:
            lines.append(line_error(number, custom_id, exc))
    return lines


def _openai_line(ctx: AppContext, principal: Principal, number: int, custom_id: str, item: dict[str, Any]) -> Line:
    if item.get("method", "POST") != "POST":
        raise BadRequest("invalid request: method: must be POST")
    if item.get("url") != ENDPOINT:
        raise BadRequest(f"invalid request: url: must be the batch's endpoint, {ENDPOINT}")
    try:
        body = ImagesRequest.model_validate(item.get("body"))
    except ValidationError as exc:
        raise validation_error(exc.errors(), prefix=("body",)) from None
    if body.reference_urls():
        raise BadRequest("invalid request: body.images: reference images are not taken in batch requests")
    if body.webhook_url:
        raise BadRequest("invalid request: body.webhook_url: a batch's request has no webhook of its own")
    spec = served_model(body.model, ctx.settings)
    asked = "moderation" if body.moderation == "low" else None
    params = safety.screen(ctx, principal, body.to_params(spec), asked, "flag")
    echo = body.model_dump(exclude_none=True, exclude={"webhook_url", "webhook_secret"})
    return Line(number, custom_id, spec.id, echo, params.model_dump(mode="json"))


async def _create_native(
    ctx: AppContext, principal: Principal, spec: Any, body: dict[str, Any], base_url: str
) -> dict[str, Any]:
    """Every input checked first, as `POST /v1/predictions` checks its `input`: one invalid input refuses the
    request (422 naming it), nothing stored."""
    limit = min(MAX_INPUTS, ctx.settings.batch_max_lines)
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not 1 <= len(inputs) <= limit:
        raise Invalid(f"invalid request: inputs: a list of 1–{limit} inputs, each the model's input object")
    unknown = set(body) - {"inputs", "webhook", "metadata", "completion_window"}
    if unknown:
        raise Invalid(f"invalid request: unknown fields: {', '.join(sorted(unknown))}")
    window, metadata = batches.window(ctx, body.get("completion_window")), batches.metadata(body.get("metadata"))
    lines: list[Line] = []
    problems: list[dict[str, Any]] = []
    for index, raw in enumerate(inputs):
        try:
            validated = spec.input_model.model_validate(raw)
        except ValidationError as exc:
            problems += validation_error(exc.errors(), prefix=("inputs", index)).extra["detail"]
            continue
        if validated.images or validated.loras:
            loc = ["inputs", index, "images" if validated.images else "loras"]
            problems.append({"loc": loc, "msg": "not taken in batches", "type": "value_error"})
            continue
        asked = "input.disable_safety_checker" if validated.disable_safety_checker else None
        params = safety.screen(ctx, principal, validated.to_params(seed_or_random(validated.seed)), asked)
        lines.append(Line(index + 1, str(index), spec.id, validated.model_dump(), params.model_dump(mode="json")))
    if problems:
        summary = "; ".join(f"{'.'.join(str(part) for part in e['loc'])}: {e['msg']}" for e in problems[:20])
        raise Invalid(f"invalid request: {summary}", detail=problems)
    hook = await webhooks.accept(ctx, "pruna", base_url, body.get("webhook"), "webhook")
    webhook = None if hook is None else {"url": hook["url"], "base_url": base_url}
    values = {"dialect": "pruna", "endpoint": "/v1/predictions", "metadata": metadata, "webhook": webhook}
    return await batches.create(ctx, principal, lines, window, values, base_url)


async def _result(ctx: AppContext, batch: RowMapping, row: dict[str, Any], base_url: str) -> dict[str, Any]:
    """A completed line's response body in its batch's dialect: the images API's (URLs or b64_json, as the line
    asked), or the Pruna prediction."""
    if batch["dialect"] == "pruna":
        return pruna.view(row, base_url)
    params, request = row["params"], row["input"]
    if request.get("response_format") == "b64_json" or request.get("return_base64"):
        data = [{"b64_json": b64, "revised_prompt": None} for b64 in await outputs_base64(ctx, row)]
    else:
        data = [{"url": url, "revised_prompt": None} for url in signed_output_urls(ctx.settings, base_url, row)]
    return {
        "created": int(row["completed_at"].timestamp()),
        "data": data,
        "output_format": "jpeg" if params["output_format"] == "jpg" else params["output_format"],
        "id": row["id"],
        "model": row["model"],
        "seed": params["seed"],
        "size": f"{params['width']}x{params['height']}",
        "timings": row["timings"],
    }
