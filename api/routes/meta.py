"""Models catalogue and health endpoints."""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from api.context import AppContext, get_ctx
from api.routes import metrics as scrape
from api.routes.dialects.bfl import BflRequest
from api.routes.dialects.common import lookup_model
from api.routes.dialects.fal import FalRequest
from api.routes.dialects.generate import GenerateRequest
from api.routes.dialects.oneminute import PromptObject
from api.routes.dialects.openai import ImagesRequest
from api.routes.dialects.wavespeed import WaveSpeedRequest
from api.routes.enhance import EnhanceRequest
from api.routes.openapi_errors import errors
from api.services import dependencies, enhance
from api.services.auth import authenticate, presented_key
from core import safety
from core.settings import Settings
from models.registry import MODELS, ModelSpec
from models.tiny import MARKER as TINY_MARKER

router = APIRouter(tags=["meta"])


def _weights(settings: Settings) -> dict[str, Any]:
    """Whether the workers serve real weights; says plainly when it is the tiny random-weights pipeline. Where
    the weights lie on the server (model_path) is the operators' business: /admin/v1/models shows it."""
    tiny = (Path(settings.model_path) / TINY_MARKER).exists()
    return {
        "random_weights": tiny,
        **({"warning": "tiny random-weights test pipeline: outputs are noise"} if tiny else {}),
    }


async def _checkers(ctx: AppContext, specs: list[ModelSpec]) -> list[dict[str, Any]]:
    """What image checker each model's workers run, as the last of them to start published it (docs/safety.md)."""
    keys = [safety.status_key(ctx.settings.queue_name, spec.id) for spec in specs]
    found = await ctx.redis.mget(keys)
    views = []
    for raw in found:
        if raw is None:
            views.append({"checked": None, "model": None, "reason": "no worker of this model has started yet"})
            continue
        status = orjson.loads(raw)
        views.append(status if status["checked"] else status | {"reason": safety.NOT_CONFIGURED})
    return views


def _describe(spec: ModelSpec, settings: Settings, signed_in: bool, checker: dict[str, Any]) -> dict[str, Any]:
    """The model as every dialect's clients expect it: OpenAI's model object plus each request schema; whether
    this deployment serves it and how many LoRAs a request may carry here (KLEIN_MAX_LORAS, below the schema's
    bound); the weights only for a caller with a key; the safety checker its workers run."""
    return (
        spec.describe()
        | {"object": "model", "created": 0, "owned_by": "black-forest-labs", "safety_checker": checker}
        | {"served": spec.id in settings.served_models, "max_loras": settings.max_loras}
        | {"prompt_enhancer": enhance.status(settings)}  # docs/enhancer.md
        | ({"weights": _weights(settings)} if signed_in else {})
        | {
            "schemas": {
                "POST /v1/predictions (input)": spec.input_schema(),
                "POST /v1/images/generations": ImagesRequest.model_json_schema(),
                "POST /v1/generate": GenerateRequest.model_json_schema(),
                "POST /api/v3/wavespeed-ai/flux-2-klein-4b/{text-to-image,edit}": WaveSpeedRequest.model_json_schema(),
                "POST /api/features (promptObject)": PromptObject.model_json_schema(),
                "POST /fal-ai/flux-2/klein/4b[/base][/edit]": FalRequest.model_json_schema(),
                "POST /v1/flux-2-klein-4b (BFL)": BflRequest.model_json_schema(),
                "POST /v1/prompts/enhance": EnhanceRequest.model_json_schema(),
            },
        }
    )


async def _signed_in(request: Request) -> bool:
    """No key: anyone may read the catalogue. A key: it must be valid (401 otherwise) and counts as a request."""
    if presented_key(request) is None:
        return False
    await authenticate(request)
    return True


@router.get("/v1/models", responses=errors(401, 429))
async def list_models(request: Request, ctx: Annotated[AppContext, Depends(get_ctx)]) -> dict[str, Any]:
    signed_in = await _signed_in(request)
    checkers = await _checkers(ctx, list(MODELS))
    data = [_describe(spec, ctx.settings, signed_in, checker) for spec, checker in zip(MODELS, checkers, strict=True)]
    return {"object": "list", "data": data}


@router.get("/v1/models/{model_id:path}", responses=errors(401, 404, 422, 429))
async def get_model(model_id: str, request: Request, ctx: Annotated[AppContext, Depends(get_ctx)]) -> dict[str, Any]:
    signed_in = await _signed_in(request)
    spec = lookup_model(model_id)
    return _describe(spec, ctx.settings, signed_in, (await _checkers(ctx, [spec]))[0])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


class Readiness(BaseModel):
    status: str
    checks: dict[str, str]


@router.get(
    "/readyz",
    responses={
        200: {"model": Readiness, "description": "PostgreSQL, Redis and the event subscription answer"},
        503: {"model": Readiness, "description": "One of them does not; `checks` says which"},
    },
)
async def readyz(ctx: Annotated[AppContext, Depends(get_ctx)]) -> JSONResponse:
    """Readiness: what the API cannot serve without (PostgreSQL, Redis, the event subscription), each within a
    second. Not S3: submits and status go without it, and an S3 outage must not take every replica out of
    service (`/healthz/deps` and `klein_dependency_up` report it)."""
    results = await asyncio.gather(
        dependencies.check(functools.partial(dependencies.postgres, ctx), timeout_s=1.0),
        dependencies.check(functools.partial(dependencies.redis, ctx), timeout_s=1.0),
    )
    checks = {
        name: "ok" if result.ok else f"error: {result.error}"
        for name, result in zip(("database", "redis"), results, strict=True)
    }
    checks["events"] = "ok" if ctx.waiter.subscribed.is_set() else "error: not subscribed"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks}, status_code=200 if ready else 503
    )


class DependencyCheck(BaseModel):
    status: str
    latency_ms: float
    error: str | None = None


class DependencyReport(BaseModel):
    status: str
    dependencies: dict[str, DependencyCheck]


@router.get(
    "/healthz/deps",
    responses={
        200: {"model": DependencyReport, "description": "Every dependency answers"},
        401: {"description": "KLEIN_METRICS_TOKEN is set and the bearer token is not it"},
        503: {"model": DependencyReport, "description": "A dependency does not answer; its entry says how it failed"},
    },
)
async def dependency_health(request: Request, ctx: Annotated[AppContext, Depends(get_ctx)]) -> JSONResponse:
    """Each dependency (postgres, redis, s3) probed now: `ok` or `error` (the exception's class), and the
    probe's milliseconds. It tells of the infrastructure, so it wants what /metrics wants: the bearer token
    of KLEIN_METRICS_TOKEN when that is set. Not a probe for Kubernetes: /readyz is."""
    if not scrape.authorized(request, ctx):
        return JSONResponse({"error": "this report needs the bearer token set in KLEIN_METRICS_TOKEN"}, 401)
    checks = await dependencies.probe(ctx)
    healthy = all(check.ok for check in checks.values())
    body = {"status": "ok" if healthy else "degraded", "dependencies": {n: c.report() for n, c in checks.items()}}
    return JSONResponse(body, status_code=200 if healthy else 503)
