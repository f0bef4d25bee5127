"""The Black Forest Labs dialect: BFL's API (docs.bfl.ai, "Generate or edit an image with FLUX.2 [klein] 4B" and
"Get Result"), so that BFL's clients (the `blackforest` package, plain requests) work with only the base URL changed.

    POST /v1/flux-2-klein-4b            (and /v1/flux-2-klein-base-4b)   → {id, polling_url}
    GET  /v1/get_result?id=ID           Pending (progress) / Ready (result.sample) / Error / Content Moderated /
                                        Task not found

Keys come in `x-key`; errors are BFL's (FastAPI's) `{"detail": ...}`, a 422 listing the fields, a wrong key 403.
`webhook_url` (+ `webhook_secret`) posts the get_result body through the webhook outbox (views/bfl.py), signed as
core/webhooks.py's `provider_headers` says.
"""

from __future__ import annotations

import itertools
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.convertors import Convertor, register_url_convertor

from api.context import AppContext, get_ctx, public_base_url
from api.errors import Answer, Invalid, dialect_route
from api.infra import metrics
from api.routes.dialects.common import seed_or_random, served_model
from api.routes.openapi_errors import BflError, errors
from api.services import live, predictions, references, webhooks
from api.services.auth import MISSING, Authenticated
from core.lifecycle import Status
from models.klein import MAX_SEED, MEGAPIXEL, GenerationParams, Prompt, floor16, size_for_ratio
from models.registry import ModelSpec
from views.bfl import not_found, result_view
from views.common import signed_output_urls

MIN_SIDE, MAX_PIXELS = 64, 4 * MEGAPIXEL  # BFL's FLUX.2 limits: ≥ 64 px a side, at most 4 MP
IMAGE_FIELDS = ("input_image", "input_image_2", "input_image_3", "input_image_4")  # klein takes at most 4


class BflModel(Convertor[str]):
    """`/v1/{model:bfl_model}`: any one path segment, so that every name (an unknown one: BFL's 404) is answered
    in BFL's shape. The platform's own `/v1/…` POST routes come first (api/app.py adds this router last)."""

    regex = r"[^/]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("bfl_model", BflModel())


def _bfl_error(error: Answer) -> Response:
    detail = error.extra.get("detail")
    if error.status == 401:  # BFL answers a missing or wrong x-key 403 (FastAPI's API-key header answer)
        message = "Not authenticated" if error.message == MISSING else "Not authenticated - Invalid Authentication"
        return JSONResponse({"detail": message}, status_code=403)
    if isinstance(detail, list):  # a 422: FastAPI's list of fields, each located in the request
        fields = [
            d | {"loc": d["loc"] if d["loc"][:1] in (["query"], ["path"]) else ["body", *d["loc"]]} for d in detail
        ]
        return JSONResponse({"detail": fields}, status_code=error.status)
    return JSONResponse({"detail": error.message}, status_code=error.status)


router = APIRouter(
    tags=["bfl"], route_class=dialect_route(_bfl_error), responses=errors(403, 422, 429, 503, shape=BflError)
)
Ctx = Annotated[AppContext, Depends(get_ctx)]


class BflRequest(BaseModel):
    """The input of BFL's FLUX.2 [klein] endpoints; anything else is a 422 naming it."""

    model_config = ConfigDict(extra="forbid")

    prompt: Prompt
    input_image: str | None = Field(None, description="edit: a URL or base64 image (a data URI too)")
    input_image_2: str | None = Field(None, description="multi-reference: the second image")
    input_image_3: str | None = Field(None, description="multi-reference: the third image")
    input_image_4: str | None = Field(None, description="multi-reference: the fourth image")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="random when unset, and reported")
    width: int | None = Field(None, description="with height; 0 or unset: 1024×1024, or the input image's ratio")
    height: int | None = Field(None, description="with width; multiples of 16 (rounded down), ≥ 64, ≤ 4 MP")
    aspect_ratio: str | None = Field(
        None, pattern=r"^\d{1,2}:\d{1,2}$", description="instead of width/height (BFL's Kontext field): W:H, 1:4–4:1"
    )
    safety_tolerance: int = Field(
        2, ge=0, le=5, description="accepted; the tenant's safety policy decides (docs/safety.md)"
    )
    output_format: Literal["jpeg", "png", "webp"] | None = "jpeg"
    prompt_upsampling: Literal[False] = Field(False, description="only false: no prompt enhancer is served")
    webhook_url: str | None = Field(None, min_length=1, max_length=2083, description="receives the result")
    webhook_secret: str | None = Field(None, description="echoed as X-Webhook-Secret and signing X-BFL-Signature")

    @model_validator(mode="after")
    def _size(self) -> BflRequest:
        sides = (self.width or 0, self.height or 0)
        if any(sides) and not all(sides):
            raise ValueError("width and height: give both (or neither)")
        if all(sides):
            if self.aspect_ratio is not None:
                raise ValueError("aspect_ratio: give it or width and height, not both")
            if min(sides) < MIN_SIDE or sides[0] * sides[1] > MAX_PIXELS:
                raise ValueError(f"width and height: each at least {MIN_SIDE}, together at most 4 megapixels")
        if self.aspect_ratio is not None:
            a, b = (int(part) for part in self.aspect_ratio.split(":"))
            if not (b and a and 1 / 4 <= a / b <= 4):
                raise ValueError("aspect_ratio: must be W:H between 1:4 and 4:1")
        return self

    def images(self) -> list[str]:
        given = [getattr(self, name) for name in IMAGE_FIELDS]
        if any(later and not earlier for earlier, later in itertools.pairwise(given)):
            raise Invalid("input_image: fill the images in order (input_image, input_image_2, …)")
        return [_as_source(image) for image in given if image]

    def to_params(self, spec: ModelSpec, reference: tuple[int, int] | None) -> GenerationParams:
        if self.width and self.height:
            width, height = floor16(self.width), floor16(self.height)
        elif self.aspect_ratio is not None:
            a, b = (int(part) for part in self.aspect_ratio.split(":"))
            width, height = size_for_ratio(a / b)
        else:
            width, height = size_for_ratio(reference[0] / reference[1]) if reference else (1024, 1024)
        return GenerationParams(
            prompt=self.prompt,
            width=width,
            height=height,
            num_inference_steps=spec.default_steps,
            guidance_scale=spec.default_guidance,
            seed=seed_or_random(self.seed),
            output_format="jpg" if self.output_format in (None, "jpeg") else self.output_format,
            output_quality=90,
        )


def _as_source(image: str) -> str:
    """BFL takes a URL or bare base64 (as its `blackforest` package sends a file): bare base64 as a data URI."""
    if image.lstrip().startswith(("http://", "https://", "data:")):
        return image
    return "data:image;base64," + "".join(image.split())


class Submitted(BaseModel):
    id: str
    polling_url: str


@router.post("/v1/{model:bfl_model}", response_model=Submitted, responses=errors(400, 404, 413, shape=BflError))
@metrics.submit_route
async def submit(
    model: Annotated[str, Path(description="BFL's endpoint name, e.g. flux-2-klein-4b")],
    body: BflRequest,
    request: Request,
    principal: Authenticated,
    ctx: Ctx,
) -> Response:
    spec = served_model(model, ctx.settings)
    images = body.images()
    echo = body.model_dump(exclude_none=True, exclude={"webhook_url", "webhook_secret"}) | {"model": model}
    async with predictions.in_flight(ctx, principal, spec, echo) as slot:
        refs = await references.resolve(ctx, principal, request, images, "input_image")
        params = body.to_params(spec, (refs[0].info.width, refs[0].info.height) if refs else None)
        base_url = public_base_url(request, ctx.settings)
        webhook = await webhooks.accept(
            ctx, "bfl", base_url, body.webhook_url, "webhook_url", secret=body.webhook_secret
        )
        row = await predictions.submit(ctx, principal, spec, echo, params, refs, slot=slot, webhook=webhook)
    return JSONResponse({"id": row["id"], "polling_url": f"{base_url}/v1/get_result?id={row['id']}"})


_STATUSES = "Pending, Ready, Error, Content Moderated, or Task not found"


@router.get("/v1/get_result", responses={200: {"description": _STATUSES}})
async def get_result(
    request: Request, principal: Authenticated, ctx: Ctx, id: Annotated[str, Query(max_length=200)]
) -> Response:
    """An unknown (or another tenant's) id is BFL's `Task not found`, answered 200 as BFL does."""
    row = await predictions.fetch(ctx, principal, id)
    if row is None:
        return JSONResponse(not_found(id))
    extras = await live.extras(ctx, row)
    sample = None
    if Status(row["status"]) is Status.COMPLETED and row.get("expired_at") is None:
        sample = signed_output_urls(ctx.settings, public_base_url(request, ctx.settings), row)[0]
    return JSONResponse(result_view(row, sample, extras))
