"""The Replicate dialect: the official `replicate` client works with only its base URL changed.

    POST /v1/models/{owner}/{name}/predictions   {"input", "webhook", "webhook_events_filter"}; `Prefer: wait[=N]`,
                                                 `Cancel-After` (a deadline: core/deadlines.py)
    POST /v1/predictions                         with `version` (Pruna's route hands such a body here)
    GET  /v1/predictions/{id}                    (its cancel and list are shared with Pruna's: `speaks_replicate`)
    GET  /v1/models/{owner}/{name}[/versions[/{id}]]

Models are the registry's, by their `owner/name` aliases; what the input means is api/routes/dialects/
replicate_input.py. Outputs are signed links any HTTP client downloads. Errors are problem details
(api/errors.py, `problem_details`).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, ValidationError

from api.context import AppContext, context, get_ctx, public_base_url
from api.errors import NotFound, Renderer, answered, dialect_route, problem_details, validation_error
from api.infra import metrics
from api.infra.jsonresponse import JSON
from api.routes import meta
from api.routes.dialects.common import header_deadline, lookup_model, served_model
from api.routes.dialects.replicate_input import (
    PredictionRequest,
    VersionedRequest,
    parse_input,
    prefer_wait,
    to_params,
    versioned_model,
)
from api.routes.openapi_errors import PLATFORM_ONLY, errors
from api.services import live, predictions, references, webhooks
from api.services.auth import Authenticated, authenticate
from api.services.principals import Principal
from api.services.rate_limit import Slot
from core import deadlines
from core.lifecycle import Status
from models.registry import ModelSpec
from views.replicate import version_id, version_object, view


class ProblemDetails(BaseModel):
    """Replicate's error shape (RFC 9457), as api/errors.py `problem_details` writes it."""

    model_config = ConfigDict(extra="allow")

    title: str
    detail: str
    status: int


def _documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`errors` (application/json: the platform's answers, 413 and some 500s and 503s), and problem details as
    Replicate's errors come: application/problem+json."""
    documented = errors(*statuses, shape=ProblemDetails)
    problem = {"application/problem+json": {"schema": ProblemDetails.model_json_schema()}}
    for status in statuses:
        if status not in PLATFORM_ONLY:
            documented[status]["content"] = problem
    return documented


router = APIRouter(tags=["replicate"], route_class=dialect_route(problem_details), responses=_documented(401, 429, 503))
Ctx = Annotated[AppContext, Depends(get_ctx)]


def speaks_replicate(request: Request) -> bool:
    """Whether a route Pruna and Replicate share answers in Replicate's shape: the caller sent its key as
    `Authorization: Bearer`, as Replicate's clients do, rather than in Pruna's (and the playground's) `apikey`."""
    headers = request.headers
    bearer = headers.get("authorization", "")[:7].lower() == "bearer "
    return bearer and "apikey" not in headers and "api-key" not in headers


def problem_for(request: Request) -> Renderer | None:
    """For `negotiated_route`: Replicate's error shape for its callers, the platform's for the others."""
    return problem_details if speaks_replicate(request) else None


async def _submit(
    request: Request, principal: Principal, spec: ModelSpec, body: PredictionRequest, slot: Slot | None = None
) -> Response:
    ctx = context(request)
    wait_s = prefer_wait(request.headers.get("prefer"), ctx.settings)
    cancel_after = request.headers.get("cancel-after")
    deadline = header_deadline("Cancel-After", cancel_after, deadlines.parse_duration, running=True)
    given, own = parse_input(spec, body.input)
    echo, idempotency_key = given.model_dump(exclude_none=True), request.headers.get("idempotency-key")
    async with predictions.in_flight(ctx, principal, spec, echo, idempotency_key, slot) as slot:
        urls, field = given.references
        refs = await references.resolve(ctx, principal, request, urls, field)
        params = to_params(given, own, (refs[0].info.width, refs[0].info.height) if refs else None)
        base_url = public_base_url(request, ctx.settings)
        webhook = await webhooks.accept(ctx, "replicate", base_url, body.webhook, "webhook", body.webhook_events_filter)
        off = "input.disable_safety_checker" if given.disable_safety_checker else None
        row = await predictions.submit(
            ctx,
            principal,
            spec,
            echo,
            params,
            refs,
            wait_s,
            idempotency_key,
            slot,
            webhook,
            disable_asked_by=off,
            deadline=deadline,
        )
    logs = row["logs"] if Status(row["status"]).terminal else []
    return JSON(view(row, base_url, ctx.settings, logs, waited=wait_s > 0), status_code=201)


_PREDICTION = {"application/json": {"schema": {"type": "object"}}}
_WAIT_HEADERS = [
    {"name": "Prefer", "in": "header", "required": False, "schema": {"type": "string", "examples": ["wait=5"]}},
    {"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string"}},
    {
        "name": "Cancel-After",
        "in": "header",
        "required": False,
        "description": "A deadline: canceled unless finished within this duration (docs/reliability.md)",
        "schema": {"type": "string", "examples": ["30s", "5m", "1h30m"]},
    },
]


@router.post(
    "/v1/models/{owner}/{name}/predictions",
    status_code=201,
    openapi_extra={"parameters": _WAIT_HEADERS},
    responses={
        201: {"description": "The prediction; final if it finished within `Prefer: wait`", "content": _PREDICTION},
        **_documented(400, 404, 409, 413, 422),
    },
)
@metrics.submit_route
async def create_prediction(
    owner: str, name: str, body: PredictionRequest, request: Request, principal: Authenticated, ctx: Ctx
) -> Response:
    return await _submit(request, principal, served_model(f"{owner}/{name}", ctx.settings), body)


async def create_versioned(request: Request, principal: Principal, slot: Slot, body: dict[str, Any]) -> Response:
    """Replicate's `POST /v1/predictions` (a body with `version`), handed over by Pruna's route with the slot it
    took; answered, errors too, in Replicate's shape."""

    async def create(request: Request) -> Response:
        try:
            versioned = VersionedRequest.model_validate(body)
        except ValidationError as exc:
            raise validation_error(exc.errors()) from None
        spec = served_model(versioned_model(versioned.version).id, context(request).settings, body_field="version")
        return await _submit(request, principal, spec, versioned, slot)

    response = await answered(request, problem_details, create)
    if response.status_code >= 400:
        await slot.give_back()  # a stored prediction keeps it (then this does nothing)
    return response


@router.get(
    "/v1/predictions/{prediction_id}",
    responses={200: {"description": "The prediction", "content": _PREDICTION}, **_documented(404, 422)},
)
async def get_prediction(prediction_id: str, request: Request, principal: Authenticated, ctx: Ctx) -> Response:
    row = await predictions.fetch_or_404(ctx, principal, prediction_id)
    base_url = public_base_url(request, ctx.settings)
    return JSON(view(row, base_url, ctx.settings, (await live.extras(ctx, row))["logs"]))


async def cancel(request: Request, prediction_id: str) -> Response:
    """`POST /v1/predictions/{id}/cancel` for Replicate's callers (Pruna's route asks `speaks_replicate`)."""

    async def canceled(request: Request) -> Response:
        principal = await authenticate(request)
        ctx = context(request)
        row = await predictions.cancel(ctx, principal, prediction_id)
        base_url = public_base_url(request, ctx.settings)
        return JSON(view(row, base_url, ctx.settings, (await live.extras(ctx, row))["logs"]))

    return await answered(request, problem_details, canceled)


@router.get("/v1/models/{owner}/{name}", responses=_documented(404, 422))
async def get_model(owner: str, name: str, request: Request, ctx: Ctx) -> dict[str, Any]:
    """Replicate's model object, beside the catalogue's description (`GET /v1/models/{id}`) this path gave before."""
    catalogue = await meta.get_model(f"{owner}/{name}", request, ctx)  # also checks a key, when one is sent
    spec = lookup_model(f"{owner}/{name}")
    return catalogue | {
        "url": f"{public_base_url(request, ctx.settings)}/v1/models/{owner}/{name}",
        "owner": owner,
        "name": name,
        "visibility": "public",
        "github_url": None,
        "paper_url": None,
        "license_url": None,
        "cover_image_url": None,
        "run_count": 0,  # not counted: runs are the tenants' business
        "default_example": None,
        "latest_version": version_object(spec),
    }


@router.get("/v1/models/{owner}/{name}/versions", responses=_documented(404, 422))
async def list_versions(owner: str, name: str) -> dict[str, Any]:
    return {"previous": None, "next": None, "results": [version_object(lookup_model(f"{owner}/{name}"))]}


@router.get("/v1/models/{owner}/{name}/versions/{version}", responses=_documented(404, 422))
async def get_version(owner: str, name: str, version: str) -> dict[str, Any]:
    spec = lookup_model(f"{owner}/{name}")
    if version != version_id(spec):
        raise NotFound(f"version {version!r} of {owner}/{name} not found; its version is {version_id(spec)}")
    return version_object(spec)
