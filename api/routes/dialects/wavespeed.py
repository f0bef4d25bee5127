"""The WaveSpeed v3 dialect (shared/seeds/002_*).

    POST /api/v3/wavespeed-ai/flux-2-klein-4b/text-to-image   (and …/edit with `images`; …/text-to-image-lora and
                                                             …/edit-lora with `loras`)
    GET  /api/v3/predictions/{id}/result

Every answer is the `{code, message, data}` envelope; statuses created/processing/completed/failed.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from api.context import AppContext, get_ctx, public_base_url
from api.errors import Answer, Invalid, NotFound, dialect_route
from api.infra import metrics
from api.routes.delivery import gone, outputs_base64
from api.routes.dialects.common import parse_size, seed_or_random, served_model
from api.routes.openapi_errors import WaveSpeedError, errors
from api.services import live, loras, predictions, references, result_cache, retention, webhooks
from api.services.auth import Authenticated
from core.lifecycle import Status
from models.klein import CONTENT_TYPES, MAX_REFERENCES, GenerationParams, Loras, Prompt
from models.registry import ModelSpec
from views.common import signed_output_urls
from views.wavespeed import view

MIN_SIDE, MAX_SIDE = 256, 1536
TASKS = ("text-to-image", "edit", "text-to-image-lora", "edit-lora")


def _envelope(error: Answer) -> Response:
    return JSONResponse({"code": error.status, "message": error.message, "data": None}, status_code=error.status)


router = APIRouter(
    tags=["wavespeed"], route_class=dialect_route(_envelope), responses=errors(401, 429, 503, shape=WaveSpeedError)
)
Ctx = Annotated[AppContext, Depends(get_ctx)]


def _side(size: str) -> tuple[int, int]:
    return parse_size(size, MIN_SIDE, MAX_SIDE, "1024*1024")


class WaveSpeedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: Prompt
    size: str = Field("1024*1024", description="WIDTH*HEIGHT, each 256–1536 (rounded down to multiples of 16)")
    # WaveSpeed's model pages list width and height, its API tables `size`: either is taken.
    width: int | None = Field(None, ge=MIN_SIDE, le=MAX_SIDE, description="with height, instead of size")
    height: int | None = Field(None, ge=MIN_SIDE, le=MAX_SIDE, description="with width, instead of size")
    seed: int = Field(-1, ge=-1, le=2147483647)
    images: list[str] = Field([], max_length=MAX_REFERENCES, description="edit: 1–4 reference image URLs")
    output_format: Literal["jpeg", "png", "webp"] = "jpeg"
    loras: Loras = Field([], description="the -lora endpoints: adapters {path, scale} (docs/lora.md)")
    enable_sync_mode: bool = False
    enable_base64_output: bool = False
    enable_safety_checker: bool = Field(
        True, description="false turns the output checker off; refused unless the account allows it (docs/safety.md)"
    )

    @field_validator("size")
    @classmethod
    def _size(cls, size: str) -> str:
        _side(size)
        return size

    @model_validator(mode="after")
    def _width_and_height(self) -> WaveSpeedRequest:
        """width and height, when given, become the size (so the stored input says what was made)."""
        if self.width is None and self.height is None:
            return self
        if self.width is None or self.height is None:
            raise ValueError("width and height: give both, or size alone")
        given = f"{self.width}*{self.height}"
        if "size" in self.model_fields_set and _side(self.size) != _side(given):
            raise ValueError(f"size {self.size!r} and width*height {given!r} disagree; give one of them")
        self.size = given
        return self

    def to_params(self, spec: ModelSpec) -> GenerationParams:
        width, height = _side(self.size)
        return GenerationParams(
            prompt=self.prompt,
            width=width,
            height=height,
            num_inference_steps=spec.default_steps,
            guidance_scale=spec.default_guidance,
            seed=seed_or_random(self.seed),
            output_format="jpg" if self.output_format == "jpeg" else self.output_format,
            output_quality=90,
        )


async def _answer(
    ctx: AppContext, request: Request, row: predictions.Row, extras: dict[str, Any] | None = None
) -> JSONResponse:
    base_url = public_base_url(request, ctx.settings)
    # WaveSpeed's outputs are plain URLs its SDK hands the caller to fetch with any HTTP client: signed links.
    outputs = signed_output_urls(ctx.settings, base_url, row)
    if row["input"].get("enable_base64_output") and row["status"] == Status.COMPLETED:
        types = [CONTENT_TYPES[row["params"]["output_format"]]] * len(row["outputs"])
        outputs = [f"data:{t};base64,{b}" for t, b in zip(types, await outputs_base64(ctx, row), strict=True)]
    data = view(row, base_url, outputs) | (extras or {})
    if row["input"].get("enable_sync_mode") and not Status(row["status"]).terminal:
        data["error"] = "Sync mode timed out; query the result at urls.get"
    return JSONResponse({"code": 200, "message": "success", "data": data})


@router.post("/api/v3/{model_path:any_path}", responses=errors(400, 404, 413, 422, shape=WaveSpeedError))
@metrics.submit_route
async def submit(
    model_path: str,
    body: WaveSpeedRequest,
    request: Request,
    principal: Authenticated,
    ctx: Ctx,
    webhook: Annotated[str | None, Query(description="a URL that receives the result (WaveSpeed's way)")] = None,
) -> Response:
    model_name, _, task = model_path.rpartition("/")
    if task not in TASKS:
        raise NotFound(f"unknown task {task!r} of {model_name!r}; known: {', '.join(TASKS)}")
    spec = served_model(model_name, ctx.settings)
    edit, with_loras = task.startswith("edit"), task.endswith("-lora")
    if edit and not body.images:
        raise Invalid("images: edit needs 1–4 reference images")
    if not edit and body.images:
        raise Invalid("images: text-to-image takes no images; use the edit endpoint")
    if body.loras and not with_loras:
        raise Invalid(f"loras: {task} takes no LoRAs; use {task}-lora")
    echo = body.model_dump(exclude_none=True) | {"model": model_path}
    async with predictions.in_flight(ctx, principal, spec, echo) as slot:
        refs = await references.resolve(ctx, principal, request, body.images, "images")
        adapters = await loras.resolve(ctx, principal, request, spec.id, body.loras, "loras")
        base_url = public_base_url(request, ctx.settings)
        accepted = await webhooks.accept(ctx, "wavespeed", base_url, webhook, "webhook")
        params = body.to_params(spec)
        wait_s = ctx.settings.try_sync_timeout_s if body.enable_sync_mode else 0.0
        row = await predictions.submit(
            ctx,
            principal,
            spec,
            echo,
            params,
            refs,
            wait_s,
            slot=slot,
            webhook=accepted,
            adapters=adapters,
            disable_asked_by=None if body.enable_safety_checker else "enable_safety_checker",
            cache=result_cache.wanted(request, body.seed),
        )
    answer = await _answer(ctx, request, row, live.of_final(row) if Status(row["status"]).terminal else None)
    if body.enable_sync_mode and body.enable_base64_output and row["status"] == Status.COMPLETED:
        await retention.after_sync_delivery(ctx, principal, row)  # the answer carries the bytes
    return answer


@router.get(
    "/api/v3/predictions/{prediction_id}/result",
    responses={**errors(404, 422, shape=WaveSpeedError), **gone(WaveSpeedError)},  # 410: base64 of expired outputs
)
async def result(prediction_id: str, request: Request, principal: Authenticated, ctx: Ctx) -> Response:
    row = await predictions.fetch_or_404(ctx, principal, prediction_id)
    return await _answer(ctx, request, row, await live.extras(ctx, row))
