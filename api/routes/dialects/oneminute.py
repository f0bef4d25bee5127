"""The 1min features dialect (shared/seeds/003_*): `POST /api/features` with `API-KEY`, answered with an aiRecord."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from api.context import AppContext, get_ctx, public_base_url
from api.infra import metrics
from api.routes.dialects.common import seed_or_random, served_model
from api.routes.openapi_errors import errors
from api.services import predictions, result_cache
from api.services.auth import Authenticated
from core.lifecycle import Status
from models.klein import MAX_SEED, GenerationParams, Prompt, size_for_aspect_ratio
from views.common import iso_z, output_urls, signed_output_urls

router = APIRouter(tags=["1min"], responses=errors(401, 429, 503))
RECORD_STATUS = {Status.COMPLETED: "SUCCESS", Status.FAILED: "FAILED", Status.CANCELED: "FAILED"}


class PromptObject(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: Prompt
    aspect_ratio: Literal["1:1", "16:9", "9:16", "3:2", "2:3", "4:5", "5:4"] = "1:1"
    output_format: Literal["webp", "jpg", "png"] = "webp"
    output_quality: int = Field(80, ge=0, le=100)
    num_inference_steps: int = Field(4, ge=1, le=4)
    go_fast: bool = True  # the platform always runs its fastest configuration
    megapixels: Literal["0.25", "1"] = "1"
    disable_safety_checker: bool = False  # refused unless the tenant allows it (docs/safety.md)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)


class FeatureRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["IMAGE_GENERATOR"]
    model: str
    promptObject: PromptObject

    def to_params(self) -> GenerationParams:
        prompt = self.promptObject
        width, height = size_for_aspect_ratio(prompt.aspect_ratio, float(prompt.megapixels))
        return GenerationParams(
            prompt=prompt.prompt,
            width=width,
            height=height,
            num_inference_steps=prompt.num_inference_steps,
            guidance_scale=1.0,
            seed=seed_or_random(prompt.seed),
            output_format=prompt.output_format,
            output_quality=prompt.output_quality,
        )


@router.post("/api/features", responses=errors(400, 413, 422))
@metrics.submit_route
async def features(
    body: FeatureRequest, request: Request, principal: Authenticated, ctx: Annotated[AppContext, Depends(get_ctx)]
) -> dict[str, Any]:
    spec = served_model(body.model, ctx.settings, body_field="model")
    row = await predictions.submit(
        ctx,
        principal,
        spec,
        body.model_dump(),
        body.to_params(),
        wait_s=ctx.settings.try_sync_timeout_s,
        disable_asked_by="promptObject.disable_safety_checker" if body.promptObject.disable_safety_checker else None,
        cache=result_cache.wanted(request, body.promptObject.seed),
    )
    status = Status(row["status"])
    base_url = public_base_url(request, ctx.settings)
    done = status is Status.COMPLETED
    return {
        "aiRecord": {
            "uuid": row["id"],
            "model": body.model,
            "type": body.type,
            "status": RECORD_STATUS.get(status, "PROCESSING"),
            "createdAt": iso_z(row["created_at"]),
            "aiRecordDetail": {
                "promptObject": body.promptObject.model_dump(exclude_none=True),
                "resultObject": [url.removeprefix(base_url).lstrip("/") for url in output_urls(base_url, row)]
                if done
                else [],
                "error": row["error"],
                "statusUrl": f"{base_url}/v1/predictions/status/{row['id']}",
            },
            "temporaryUrl": signed_output_urls(ctx.settings, base_url, row)[0] if done else None,
        }
    }
