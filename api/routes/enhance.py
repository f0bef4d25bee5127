"""The prompt enhancer (docs/enhancer.md): `POST /v1/prompts/enhance`, its job's status and cancel.

The rewrite is a job on the model's GPU workers, like a prediction: queued, leased, cancelable, timed and billed.
With `Try-Sync: true` or `Prefer: wait[=N]` the request waits for it (up to KLEIN_TRY_SYNC_TIMEOUT_S) and answers
200 with the rewrite; otherwise, or if it is not done by then, 201 with its `get_url`.
"""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from api.context import context, public_base_url
from api.errors import TOO_DEEP, Invalid, validation_error
from api.infra.jsonresponse import JSON
from api.routes.dialects.common import served_model
from api.routes.dialects.replicate_input import prefer_wait
from api.routes.openapi_errors import errors
from api.services import enhance
from api.services.auth import authenticate
from api.services.predictions import require_active
from core.enhance import Style
from core.lifecycle import Status
from models.klein import MAX_REFERENCES, Prompt
from models.registry import DEFAULT_MODEL

router = APIRouter(tags=["prompts"], responses=errors(401, 429, 503))


class EnhanceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: Prompt = Field(description="The prompt to rewrite.")
    images: list[Annotated[str, Field(min_length=1, max_length=8192)]] = Field(
        [],
        max_length=MAX_REFERENCES,
        description="The reference images the prompt will edit (URLs, data URIs or /v1/files URLs). The enhancer "
        "reads text only: their number turns the rewrite into an edit instruction; they are not fetched.",
    )
    style: Style | None = Field(None, description="A style the rewrite asks for.")
    model: str | None = Field(
        None, description="Whose workers rewrite it (default: the Model header, else flux-klein-4b)"
    )


_SCHEMA = EnhanceRequest.model_json_schema()
_JOB = {"application/json": {"schema": {"type": "object"}}}


@router.post(
    "/v1/prompts/enhance",
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": _SCHEMA}}}},
    responses={
        200: {"description": "Rewritten within the Try-Sync wait", "content": _JOB},
        201: {"description": "Accepted: queued or running; poll get_url", "content": _JOB},
        **errors(400, 403, 404, 413, 422, 501),
    },
)
async def enhance_prompt(request: Request) -> Response:
    principal = await authenticate(request)  # rate-limited as every authenticated request
    ctx = context(request)
    enhance.require_enabled(ctx.settings)
    require_active(principal)
    body = await _body(request)
    try:
        asked = EnhanceRequest.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None
    field = "model" if asked.model else None
    spec = served_model(asked.model or request.headers.get("model") or DEFAULT_MODEL.id, ctx.settings, field)
    enhance.screen(ctx, principal, asked.prompt)
    wait_s = prefer_wait(request.headers.get("prefer"), ctx.settings)
    if _truthy(request.headers.get("try-sync")):
        wait_s = ctx.settings.try_sync_timeout_s
    job_input = {"prompt": asked.prompt, "style": asked.style, "references": len(asked.images)}
    row = await enhance.submit(ctx, principal, spec.id, job_input, wait_s)
    done = Status(row["status"]).terminal
    return JSON(enhance.view(row, public_base_url(request, ctx.settings)), status_code=200 if done else 201)


@router.get("/v1/prompts/enhance/{job_id}", responses={200: {"description": "The job", "content": _JOB}, **errors(404)})
async def enhancement(job_id: str, request: Request) -> Response:
    principal = await authenticate(request)
    ctx = context(request)
    row = await enhance.fetch_or_404(ctx, principal, job_id)
    return JSON(enhance.view(row, public_base_url(request, ctx.settings)))


@router.post(
    "/v1/prompts/enhance/{job_id}/cancel",
    responses={200: {"description": "The job, canceled unless it had finished", "content": _JOB}, **errors(404, 422)},
)
async def cancel_enhancement(job_id: str, request: Request) -> Response:
    principal = await authenticate(request)
    ctx = context(request)
    row = await enhance.cancel(ctx, principal, job_id)
    return JSON(enhance.view(row, public_base_url(request, ctx.settings)))


async def _body(request: Request) -> Any:
    try:
        return orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc):
            raise Invalid(TOO_DEEP) from None
        raise Invalid("invalid request: body is not valid JSON") from None


def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().lower() in ("true", "1", "yes")
