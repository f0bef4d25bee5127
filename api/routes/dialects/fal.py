"""The fal dialect: fal's queue API (docs.fal.ai, "Queue"), so that the official `fal-client` works with only
`FAL_QUEUE_RUN_HOST` changed.

    POST /fal-ai/flux-2/klein/4b[/base][/edit]            → {request_id, response_url, status_url, cancel_url}
    POST /fal-run/fal-ai/flux-2/klein/4b[…]               fal's synchronous run: waits, answers the result
    GET  /fal-ai/{app}/requests/{id}/status[?logs=1]      IN_QUEUE (queue_position) / IN_PROGRESS / COMPLETED
    GET  /fal-ai/{app}/requests/{id}/status/stream        the same objects as server-sent events, until COMPLETED
    GET  /fal-ai/{app}/requests/{id}                      the result: images, seed, timings, has_nsfw_concepts
    PUT  /fal-ai/{app}/requests/{id}/cancel

`?fal_webhook=URL` posts fal's webhook payload through the webhook outbox (signed as every webhook of ours,
not with fal's keys); `X-Fal-Request-Timeout` is a time-to-start deadline (core/deadlines.py), its expiry fal's 504.
Keys come as `Authorization: Key <key>`; errors are fal's
`{"detail": ...}` (a 422's detail lists the fields).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette import EventSourceResponse, ServerSentEvent

from api.context import AppContext, get_ctx, public_base_url
from api.errors import Answer, BadRequest, Gone, Invalid, dialect_route
from api.infra import metrics
from api.routes.delivery import gone, outputs_base64
from api.routes.dialects.common import (
    completed,
    deadline_exceeded,
    header_deadline,
    seed_or_random,
    served_model,
)
from api.routes.openapi_errors import FalError, errors
from api.routes.stream import check_stream_limit, streams_of, woken
from api.services import live, predictions, references, result_cache, webhooks
from api.services.auth import Authenticated
from api.services.principals import Principal
from core import deadlines
from core.lifecycle import Status
from models.klein import CONTENT_TYPES, MAX_OUTPUTS, MAX_REFERENCES, GenerationParams, Prompt, floor16, size_for_ratio
from models.registry import ModelSpec
from views.common import signed_output_urls
from views.fal import request_urls, result_view, status_view

MIN_SIDE, MAX_SIDE = 256, 1536
RUN_PREFIX = "/fal-run"  # fal's synchronous host (fal.run) as a path under ours: FAL_RUN_HOST=<host>/fal-run
# fal's image_size presets (the same names across its image endpoints)
PRESETS: dict[str, tuple[int, int]] = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}
Preset = Literal["square_hd", "square", "portrait_4_3", "portrait_16_9", "landscape_4_3", "landscape_16_9"]


def _fal_error(error: Answer) -> Response:
    detail = error.extra.get("detail")
    if isinstance(detail, list):  # a 422: fal's (FastAPI's) list of fields, each located in the request
        body: dict[str, Any] = {"detail": [d | {"loc": _located(d["loc"])} for d in detail]}
    else:
        body = {"detail": error.message}
    return JSONResponse(body, status_code=error.status)


def _located(loc: list[str | int]) -> list[str | int]:
    return loc if loc[:1] in (["header"], ["query"], ["path"]) else ["body", *loc]


router = APIRouter(
    tags=["fal"], route_class=dialect_route(_fal_error), responses=errors(401, 404, 422, 429, 503, shape=FalError)
)
Ctx = Annotated[AppContext, Depends(get_ctx)]


class ImageSize(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    width: int = Field(ge=MIN_SIDE, le=MAX_SIDE)
    height: int = Field(ge=MIN_SIDE, le=MAX_SIDE)


class FalRequest(BaseModel):
    """The input of fal's FLUX.2 [klein] 4B endpoints (text-to-image, /edit, /base, /base/edit); anything else is a
    422 naming it."""

    model_config = ConfigDict(extra="forbid")

    prompt: Prompt
    image_size: Preset | ImageSize | None = Field(
        None, description="a preset name or {width, height}; landscape_4_3 by default, the input image's for edits"
    )
    num_inference_steps: int | None = Field(None, ge=1, le=50, description="the model's default when unset")
    guidance_scale: float | None = Field(None, ge=0, le=20, description="base models; the model's default when unset")
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    num_images: int = Field(1, ge=1, le=MAX_OUTPUTS)
    output_format: Literal["jpeg", "png", "webp"] = "png"
    enable_safety_checker: bool = Field(
        True, description="false turns the output checker off; refused unless the account allows it (docs/safety.md)"
    )
    sync_mode: bool = Field(False, description="the result's images as data URIs instead of links")
    image_urls: list[str] = Field([], max_length=MAX_REFERENCES, description="edit: 1–4 reference image URLs")

    def size(self, reference: tuple[int, int] | None) -> tuple[int, int]:
        if isinstance(self.image_size, ImageSize):
            return floor16(self.image_size.width), floor16(self.image_size.height)
        if self.image_size is None and reference is not None:
            return size_for_ratio(reference[0] / reference[1])
        return PRESETS[self.image_size or "landscape_4_3"]

    def to_params(self, spec: ModelSpec, reference: tuple[int, int] | None) -> GenerationParams:
        width, height = self.size(reference)
        return GenerationParams(
            prompt=self.prompt,
            width=width,
            height=height,
            num_inference_steps=self.num_inference_steps or spec.default_steps,
            guidance_scale=spec.default_guidance if self.guidance_scale is None else self.guidance_scale,
            seed=seed_or_random(self.seed),
            output_format="jpg" if self.output_format == "jpeg" else self.output_format,
            output_quality=90,
            num_outputs=self.num_images,
        )


def _app(app_path: str) -> tuple[str, bool]:
    """fal's app id (`fal-ai/...`) and whether it is an /edit endpoint."""
    model_path = app_path.removesuffix("/edit")
    return f"fal-ai/{model_path}", model_path != app_path


class Queued(BaseModel):
    request_id: str
    response_url: str
    status_url: str
    cancel_url: str


class CancelAnswer(BaseModel):
    status: Literal["CANCELLATION_REQUESTED", "ALREADY_COMPLETED"]


_OBJECT = {"application/json": {"schema": {"type": "object"}}}


Webhook = Annotated[str | None, Query(description="a URL that receives the result (fal's way)")]
Priority = Annotated[Literal["normal", "low"], Header(description="low: behind the rest of the tenant's queue")]
Timeout = Annotated[
    str | None, Header(description="seconds: canceled unless a worker starts it by then (a time-to-start deadline)")
]


@router.post("/fal-ai/{app_path:any_path}", response_model=Queued, responses=errors(400, 413, shape=FalError))
@metrics.submit_route
async def submit(
    app_path: str,
    body: FalRequest,
    request: Request,
    principal: Authenticated,
    ctx: Ctx,
    fal_webhook: Webhook = None,
    x_fal_queue_priority: Priority = "normal",
    x_fal_request_timeout: Timeout = None,
) -> Response:
    row = await _accept(
        ctx, request, principal, app_path, body, fal_webhook, x_fal_queue_priority, x_fal_request_timeout
    )
    base_url = public_base_url(request, ctx.settings)
    return JSONResponse({"request_id": row["id"], **request_urls(base_url, f"fal-ai/{app_path}", row["id"])})


@router.post(
    f"{RUN_PREFIX}/fal-ai/{{app_path:any_path}}",
    responses={
        200: {"description": "The result, as …/requests/{id} answers it", "content": _OBJECT},
        **errors(400, 413, 500, 504, shape=FalError),
    },
)
@metrics.submit_route
async def run(
    app_path: str,
    body: FalRequest,
    request: Request,
    principal: Authenticated,
    ctx: Ctx,
    fal_webhook: Webhook = None,
    x_fal_queue_priority: Priority = "normal",
    x_fal_request_timeout: Timeout = None,
) -> Response:
    """fal's synchronous host (`fal_client.run`, FAL_RUN_HOST=<host>/fal-run): the request waits for its result (up
    to KLEIN_TRY_SYNC_TIMEOUT_S; past it a 504 naming the request, which carries on and can be read by its id)."""
    wait_s = ctx.settings.try_sync_timeout_s
    row = await _accept(
        ctx, request, principal, app_path, body, fal_webhook, x_fal_queue_priority, x_fal_request_timeout, wait_s
    )
    if deadline_exceeded(row):
        return _deadline_answer()
    return JSONResponse(await _result_body(ctx, request, completed(row, wait_s)))


async def _accept(
    ctx: AppContext,
    request: Request,
    principal: Principal,
    app_path: str,
    body: FalRequest,
    fal_webhook: str | None,
    priority: str,
    request_timeout: str | None,
    wait_s: float = 0.0,
) -> predictions.Row:
    """The request stored and queued (and waited for, `wait_s`), or refused in fal's shape."""
    deadline = header_deadline("X-Fal-Request-Timeout", request_timeout, deadlines.parse_seconds, False)
    model_id, edit = _app(app_path)
    spec = served_model(model_id, ctx.settings)
    if edit and not body.image_urls:
        raise Invalid("image_urls: the edit endpoint needs 1–4 image URLs")
    if not edit and body.image_urls:
        raise Invalid("image_urls: text-to-image takes no images; use the /edit endpoint")
    app_id = f"fal-ai/{app_path}"
    echo = body.model_dump(exclude_none=True) | {"app_id": app_id}
    async with predictions.in_flight(ctx, principal, spec, echo) as slot:
        refs = await references.resolve(ctx, principal, request, body.image_urls, "image_urls")
        params = body.to_params(spec, (refs[0].info.width, refs[0].info.height) if refs else None)
        base_url = public_base_url(request, ctx.settings)
        webhook = await webhooks.accept(ctx, "fal", base_url, fal_webhook, "fal_webhook")
        off = None if body.enable_safety_checker else "enable_safety_checker"
        row = await predictions.submit(
            ctx,
            principal,
            spec,
            echo,
            params,
            refs,
            wait_s,
            slot=slot,
            webhook=webhook,
            disable_asked_by=off,
            last_in_queue=priority == "low",
            deadline=deadline,
            cache=result_cache.wanted(request, body.seed),
        )
    return row


@router.get(
    "/fal-ai/{app_path:any_path}/requests/{request_id}/status",
    responses={
        200: {"description": "IN_PROGRESS or COMPLETED", "content": _OBJECT},
        202: {"description": "IN_QUEUE, with queue_position", "content": _OBJECT},
    },
)
async def status(
    app_path: str,
    request_id: str,
    request: Request,
    principal: Authenticated,
    ctx: Ctx,
    logs: Annotated[bool, Query(description="1: include the request's logs")] = False,
) -> Response:
    row = await predictions.fetch_or_404(ctx, principal, request_id)
    extras = await live.extras(ctx, row)
    base_url = public_base_url(request, ctx.settings)
    accepted = Status(row["status"]) is Status.CREATED
    return JSONResponse(status_view(row, base_url, extras, logs), status_code=202 if accepted else 200)


@router.get(
    "/fal-ai/{app_path:any_path}/requests/{request_id}/status/stream",
    response_class=EventSourceResponse,
    responses={200: {"description": "Server-Sent Events: the status object", "content": {"text/event-stream": {}}}},
)
async def status_stream(
    app_path: str,
    request_id: str,
    request: Request,
    principal: Authenticated,
    ctx: Ctx,
    logs: Annotated[bool, Query(description="1: include the request's logs")] = False,
) -> EventSourceResponse:
    row = await predictions.fetch_or_404(ctx, principal, request_id)
    check_stream_limit(ctx, principal)
    events = _status_events(ctx, principal, row, public_base_url(request, ctx.settings), logs)
    return EventSourceResponse(events, ping=15, headers={"Cache-Control": "no-store"})


async def _status_events(
    ctx: AppContext, principal: Principal, row: predictions.Row, base_url: str, with_logs: bool
) -> AsyncIterator[ServerSentEvent]:
    """The status object each time it changes (a queue position, a log line), the last one COMPLETED."""
    shown = None
    with ctx.waiter.watch(row["id"], streams_of(principal)) as finished, ctx.progress.watch(row["id"]) as more:
        while True:
            view = status_view(row, base_url, await live.extras(ctx, row), with_logs)
            if view != shown:
                shown = view
                yield ServerSentEvent(data=orjson.dumps(view).decode())
            if Status(row["status"]).terminal:
                return
            await woken(finished, more, ctx.settings.stream_refresh_s)
            finished.clear()
            row = await predictions.fetch_or_404(ctx, principal, row["id"])


@router.get(
    "/fal-ai/{app_path:any_path}/requests/{request_id}",
    responses={
        200: {"description": "The result: images, seed, timings, has_nsfw_concepts, prompt", "content": _OBJECT},
        **errors(400, 500, 504, shape=FalError),  # 400: in progress, or blocked by the policy; 504: deadline
        **gone(FalError),
    },
)
async def result(app_path: str, request_id: str, request: Request, principal: Authenticated, ctx: Ctx) -> Response:
    row = await predictions.fetch_or_404(ctx, principal, request_id)
    if not Status(row["status"]).terminal:
        raise BadRequest("Request is still in progress")  # fal's answer
    if deadline_exceeded(row):
        return _deadline_answer()
    completed(row, 0)  # failed (blocked by the content policy: 400), canceled: fal's error answers
    return JSONResponse(await _result_body(ctx, request, row))


def _deadline_answer() -> Response:
    """fal's answer to a request its X-Fal-Request-Timeout expired."""
    detail = f"{deadlines.DEADLINE_EXCEEDED}: not started within its X-Fal-Request-Timeout"
    return JSONResponse({"detail": detail}, status_code=504, headers={"X-Fal-Request-Timeout-Type": "user"})


async def _result_body(ctx: AppContext, request: Request, row: predictions.Row) -> dict[str, Any]:
    request_id = row["id"]
    if row.get("expired_at") is not None:
        raise Gone(f"request {request_id!r}: its images are no longer stored (data retention)")
    if row["input"].get("sync_mode"):
        content_type = CONTENT_TYPES[row["params"]["output_format"]]
        urls = [f"data:{content_type};base64,{b}" for b in await outputs_base64(ctx, row)]
    else:
        urls = signed_output_urls(ctx.settings, public_base_url(request, ctx.settings), row)
    return result_view(row, urls)


@router.put(
    "/fal-ai/{app_path:any_path}/requests/{request_id}/cancel",
    status_code=202,
    responses={202: {"model": CancelAnswer}, 400: {"model": CancelAnswer, "description": "already completed"}},
)
async def cancel(app_path: str, request_id: str, principal: Authenticated, ctx: Ctx) -> Response:
    """fal's answers: 202 `CANCELLATION_REQUESTED`, or 400 `ALREADY_COMPLETED` for a finished request."""
    canceled = await predictions.cancel_of(ctx, principal.tenant_id, request_id)
    if canceled is not None:
        return JSONResponse({"status": "CANCELLATION_REQUESTED"}, status_code=202)
    await predictions.fetch_or_404(ctx, principal, request_id)
    return JSONResponse({"status": "ALREADY_COMPLETED"}, status_code=400)
