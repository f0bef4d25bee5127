"""The OpenAI-style images dialect (shared/seeds/004_*): `POST /v1/images/generations`.

Works with the official `openai` client (`images.generate`, url or b64_json). Errors are
`{"error": {"message", "type", "param", "code"}}`. `url` outputs are signed delivery links.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from api.context import AppContext, get_ctx, public_base_url
from api.errors import Answer, dialect_route
from api.infra import metrics
from api.routes.delivery import outputs_base64
from api.routes.dialects.common import completed, parse_size, seed_or_random, served_model
from api.routes.openapi_errors import OpenAIError, errors
from api.services import predictions, references, retention, webhooks
from api.services.auth import Authenticated
from core import deadlines
from models.klein import (
    MAX_OUTPUTS,
    MAX_REFERENCES,
    MAX_SEED,
    GenerationParams,
    Prompt,
    floor16,
    size_for_aspect_ratio,
)
from models.registry import ModelSpec
from views.common import signed_output_urls

MIN_SIDE, MAX_SIDE, MAX_PIXELS = 256, 2048, 1_048_576
ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}


def _openai_error(error: Answer) -> Response:
    kind = ERROR_TYPES.get(error.status, "invalid_request_error" if error.status < 500 else "server_error")
    detail = error.extra.get("detail") or [{}]
    param = ".".join(str(p) for p in detail[0].get("loc", [])) or None
    body = {"error": {"message": error.message, "type": kind, "param": param, "code": error.extra.get("code")}}
    return JSONResponse(body, status_code=error.status)


router = APIRouter(
    tags=["openai"], route_class=dialect_route(_openai_error), responses=errors(401, 429, 503, shape=OpenAIError)
)


class ImagesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: Prompt
    model: str = "flux-2-klein-4b"
    negative_prompt: str | None = Field(None, description="accepted for compatibility; the distilled model ignores it")
    aspect_ratio: Literal["1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3"] = "1:1"
    size: str | None = Field(None, description="WIDTHxHEIGHT, at most 1,048,576 pixels; overrides aspect_ratio")
    width: int | None = Field(None, ge=MIN_SIDE, le=MAX_SIDE)
    height: int | None = Field(None, ge=MIN_SIDE, le=MAX_SIDE)
    num_inference_steps: int | None = Field(None, ge=1, le=12, description="default: the model's (4; base 50)")
    guidance_scale: float | None = Field(
        None, ge=0, le=8, description="default: the model's; the distilled model ignores it, the base model's is 4"
    )
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    moderation: Literal["auto", "low"] = Field(
        "auto",
        description="auto: the account's safety policy; low: outputs checked and flagged, never blocked or blurred "
        "(refused unless the account allows relaxing the checker; docs/safety.md)",
    )
    n: int | None = Field(None, ge=1, le=MAX_OUTPUTS)
    num_images: int | None = Field(None, ge=1, le=MAX_OUTPUTS)
    format: Literal["webp", "png", "jpg", "jpeg"] | None = None
    output_format: Literal["webp", "png", "jpeg"] | None = None  # the openai client's name for `format`
    response_format: Literal["url", "b64_json"] = "url"
    return_base64: bool = False
    webhook_url: str | None = Field(None, description="also POST the result here (Standard Webhooks signed)")
    webhook_secret: str | None = Field(None, description="sign the webhook with this instead of the tenant's")
    max_sequence_length: int = Field(512, ge=64, le=512)
    images: list[str] | str = Field([], description="reference image URLs (a list, or comma-separated)")
    deadline_s: float | None = Field(
        None,
        ge=deadlines.MIN_S,
        le=deadlines.MAX_S,
        allow_inf_nan=False,
        description="canceled (a 504, not billed) unless finished within this many seconds (docs/reliability.md)",
    )
    # Accepted from OpenAI clients, without effect here.
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    stream: Literal[False] | None = None

    @model_validator(mode="after")
    def _size_rules(self) -> ImagesRequest:
        if (self.width is None) != (self.height is None):
            raise ValueError("width and height must be set together")
        width, height = self.dimensions()
        if width * height > MAX_PIXELS:
            raise ValueError(f"width × height must be at most {MAX_PIXELS} pixels, got {width}×{height}")
        if len(self.reference_urls()) > MAX_REFERENCES:
            raise ValueError(f"at most {MAX_REFERENCES} reference images")
        return self

    def dimensions(self) -> tuple[int, int]:
        if self.width is not None and self.height is not None:
            return floor16(self.width), floor16(self.height)
        if self.size not in (None, "auto"):
            try:
                return parse_size(self.size, MIN_SIDE, MAX_SIDE, "1024x1024")
            except ValueError as exc:
                raise ValueError(f"size {exc}") from None
        return size_for_aspect_ratio(self.aspect_ratio)

    def reference_urls(self) -> list[str]:
        if isinstance(self.images, str):
            return [url.strip() for url in self.images.split(",") if url.strip()]
        return self.images

    def file_format(self) -> Literal["webp", "png", "jpg"]:
        chosen = self.format or self.output_format or "webp"
        return "jpg" if chosen == "jpeg" else chosen

    def to_params(self, spec: ModelSpec) -> GenerationParams:
        width, height = self.dimensions()
        return GenerationParams(
            prompt=self.prompt,
            width=width,
            height=height,
            num_inference_steps=self.num_inference_steps or spec.default_steps,
            guidance_scale=spec.default_guidance if self.guidance_scale is None else self.guidance_scale,
            seed=seed_or_random(self.seed),
            output_format=self.file_format(),
            output_quality=90,
            num_outputs=self.num_images or self.n or 1,
            max_sequence_length=self.max_sequence_length,
        )


@router.post("/v1/images/generations", responses=errors(400, 404, 413, 422, 500, 504, shape=OpenAIError))
@metrics.submit_route
async def generate(
    body: ImagesRequest, request: Request, principal: Authenticated, ctx: Annotated[AppContext, Depends(get_ctx)]
) -> dict[str, Any]:
    spec = served_model(body.model, ctx.settings)  # OpenAI answers an unknown model 404
    echo = body.model_dump(exclude_none=True, exclude={"webhook_url", "webhook_secret"})
    async with predictions.in_flight(ctx, principal, spec, echo) as slot:
        refs = await references.resolve(ctx, principal, request, body.reference_urls(), "images")
        webhook = await webhooks.accept(
            ctx,
            "openai",
            public_base_url(request, ctx.settings),
            body.webhook_url,
            "webhook_url",
            secret=body.webhook_secret,
        )
        params = body.to_params(spec)
        wait_s = ctx.settings.try_sync_timeout_s
        submitted = await predictions.submit(
            ctx,
            principal,
            spec,
            echo,
            params,
            refs,
            wait_s,
            slot=slot,
            webhook=webhook,
            disable_asked_by="moderation" if body.moderation == "low" else None,
            disable_means="flag",
            deadline=None if body.deadline_s is None else deadlines.Deadline(body.deadline_s),
        )
    row = completed(submitted, wait_s)
    if body.response_format == "b64_json" or body.return_base64:
        data = [{"b64_json": b64, "revised_prompt": None} for b64 in await outputs_base64(ctx, row)]
        await retention.after_sync_delivery(ctx, principal, row)
    else:
        urls = signed_output_urls(ctx.settings, public_base_url(request, ctx.settings), row)
        data = [{"url": url, "revised_prompt": None} for url in urls]
    return {
        "created": int(time.time()),
        "data": data,
        "output_format": "jpeg" if params.output_format == "jpg" else params.output_format,
        "id": row["id"],
        "model": spec.id,
        "seed": params.seed,
        "size": f"{params.width}x{params.height}",
        "timings": row["timings"],
    }
