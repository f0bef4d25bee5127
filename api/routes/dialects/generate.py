"""The Klein generate dialect (shared/seeds/001_*): `POST /v1/generate`, synchronous, raw PNG bytes back.

The workflow follows the reference-image count: 0 text-to-image, 1 edit, 2–4 multi-reference.
The body is JSON, multipart or urlencoded, with the same fields. Images come as multipart files
`images` (these win) or `image_uris` (a JSON array of URLs or base64 data URIs).
Errors are `{"detail": "..."}`: 401, 422, 504 past the time limit, 500.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from api.context import AppContext, get_ctx, public_base_url
from api.errors import TOO_DEEP, Answer, Invalid, dialect_route, validation_error
from api.infra import metrics
from api.routes.delivery import read_output
from api.routes.dialects.common import completed, seed_or_random, served_model
from api.routes.openapi_errors import KleinError, errors, image
from api.services import loras, predictions, references, result_cache, retention, webhooks
from api.services.auth import Authenticated
from api.services.files import read_upload
from models.klein import MAX_SEED, NAMED_SIZES, GenerationParams, Loras, Prompt
from models.registry import ModelSpec


def _detail(error: Answer) -> Response:
    return JSONResponse({"detail": error.message}, status_code=error.status)


router = APIRouter(
    tags=["klein"], route_class=dialect_route(_detail), responses=errors(401, 429, 503, shape=KleinError)
)
FORMS = ("multipart/form-data", "application/x-www-form-urlencoded")
NamedRatio = Literal["square", "landscape", "portrait", "photo", "photo_v", "standard", "standard_v", "wide"]


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: Prompt
    model: str = "flux2-klein-4b"
    aspect_ratio: NamedRatio = "landscape"
    image_uris: list[str] = []
    seed: int = Field(-1, ge=-1, le=MAX_SEED)
    loras: Loras = Field([], description="LoRA adapters {path, scale} (JSON bodies; docs/lora.md)")
    webhook_url: str | None = Field(None, description="also POST the result here (Standard Webhooks signed)")
    webhook_secret: str | None = Field(None, description="sign the webhook with this instead of the tenant's")

    def to_params(self, spec: ModelSpec) -> GenerationParams:
        """Klein's generate endpoint: a named size, the model's own steps and guidance, a PNG."""
        width, height = NAMED_SIZES[self.aspect_ratio]
        return GenerationParams(
            prompt=self.prompt,
            width=width,
            height=height,
            num_inference_steps=spec.default_steps,
            guidance_scale=spec.default_guidance,
            seed=seed_or_random(self.seed),
            output_format="png",
            output_quality=100,
        )


async def _parse(request: Request, max_image_bytes: int) -> tuple[dict[str, Any], list[bytes]]:
    """The fields and the uploaded files of a JSON, multipart or urlencoded request."""
    if not request.headers.get("content-type", "").startswith(FORMS):
        try:
            body = await request.json()
        except ValueError:
            raise Invalid(f"body must be JSON, {' or '.join(FORMS)}") from None
        except RecursionError:
            raise Invalid(TOO_DEEP) from None
        if not isinstance(body, dict):
            raise Invalid("body must be a JSON object")
        return body, []
    form = await request.form(max_files=16, max_fields=16)
    fields: dict[str, Any] = {}
    uploads: list[bytes] = []
    for name, value in form.multi_items():
        if not isinstance(value, str):
            if name != "images":
                raise Invalid(f"unexpected file field {name!r}: send reference images as `images`")
            uploads.append(await read_upload(value, max_image_bytes))
        elif name == "image_uris":
            try:
                fields[name] = json.loads(value)
            except (ValueError, RecursionError):
                raise Invalid("image_uris: must be a JSON array of URLs or data URIs") from None
        else:
            fields[name] = value
    if "seed" in fields:
        try:
            fields["seed"] = int(fields["seed"])
        except ValueError:
            raise Invalid("seed: must be an integer") from None
    return fields, uploads


_FORM_FIELDS: dict[str, Any] = {
    "prompt": {"type": "string"},
    "model": {"type": "string"},
    "aspect_ratio": {"type": "string", "enum": list(NAMED_SIZES)},
    "seed": {"type": "integer"},
    "image_uris": {"type": "string", "description": "a JSON array of URLs or base64 data URIs"},
    "webhook_url": {"type": "string"},
    "webhook_secret": {"type": "string"},
}
_IMAGES = {"images": {"type": "array", "items": {"type": "string", "format": "binary"}, "maxItems": 4}}
_REQUEST_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": GenerateRequest.model_json_schema()},
        "multipart/form-data": {
            "schema": {"type": "object", "required": ["prompt"], "properties": _FORM_FIELDS | _IMAGES}
        },
        "application/x-www-form-urlencoded": {
            "schema": {"type": "object", "required": ["prompt"], "properties": _FORM_FIELDS}
        },
    },
}


@router.post(
    "/v1/generate",
    response_class=Response,
    openapi_extra={"requestBody": _REQUEST_BODY},
    responses={**image("The generated PNG", "image/png"), **errors(400, 413, 422, 500, 504, shape=KleinError)},
)
@metrics.submit_route
async def generate(
    request: Request, principal: Authenticated, ctx: Annotated[AppContext, Depends(get_ctx)]
) -> Response:
    fields, uploads = await _parse(request, ctx.settings.max_image_bytes)
    try:
        body = GenerateRequest.model_validate(fields)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None
    spec = served_model(body.model, ctx.settings, body_field="model")
    sources: list[str | bytes] = list(uploads) if uploads else list(body.image_uris)
    field = "images" if uploads else "image_uris"
    echo = body.model_dump(exclude={"webhook_url", "webhook_secret"}) | {"images": len(uploads)}
    async with predictions.in_flight(ctx, principal, spec, echo) as slot:
        refs = await references.resolve(ctx, principal, request, sources, field)
        webhook = await webhooks.accept(
            ctx,
            "generate",
            public_base_url(request, ctx.settings),
            body.webhook_url,
            "webhook_url",
            secret=body.webhook_secret,
        )
        adapters = await loras.resolve(ctx, principal, request, spec.id, body.loras, "loras")
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
            adapters=adapters,
            cache=result_cache.wanted(request, body.seed),
        )
    row = completed(submitted, wait_s)
    png = await read_output(ctx, row, row["outputs"][0])
    await retention.after_sync_delivery(ctx, principal, row)
    headers = {"X-Prediction-Id": row["id"], "X-Seed": str(params.seed), "X-Content-Type-Options": "nosniff"}
    return Response(png, media_type="image/png", headers=headers)
