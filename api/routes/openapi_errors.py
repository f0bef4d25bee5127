"""What the OpenAPI schema says each operation answers: our real error shapes and statuses.

Routers pass `responses=errors(...)`. An error raised in a dialect route is answered in the
dialect's shape (api/errors.py: `dialect_route`); a body over the limit (413, api/infra/body_limit.py)
and an unreachable database or Redis (503, the app's handlers) are answered in the platform's
`{"error": ...}` shape on every route, so a dialect documents both for those statuses.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

DESCRIPTIONS = {
    400: "The body could not be parsed: not UTF-8, or multipart without a boundary",
    401: "Missing, unknown, revoked or expired key",
    403: "Delivery link invalid or expired",
    404: "Not found, or not yours",
    409: "Conflict",
    413: "Request body over the size limit",
    422: "Invalid request, naming each field",
    429: "Over a limit; see Retry-After",
    500: "The generation failed",
    501: "Switched off on this deployment (the prompt enhancer: KLEIN_ENHANCER=off)",
    503: "Database, Redis or queue unreachable; see Retry-After",
    504: "The generation outlasted the time limit (KLEIN_TRY_SYNC_TIMEOUT_S)",
}


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class Error(BaseModel):
    """The platform's error shape: a readable message, sometimes with more fields."""

    model_config = ConfigDict(extra="allow")

    error: str
    detail: list[FieldError] | None = None
    known_models: list[str] | None = None


class KleinError(BaseModel):
    """The Klein generate dialect's error shape."""

    detail: str


class FalError(BaseModel):
    """fal's error shape: a message, or (a 422) the list of fields."""

    detail: str | list[FieldError]


class BflError(BaseModel):
    """Black Forest Labs' error shape (FastAPI's): a message, or (a 422) the list of fields."""

    detail: str | list[FieldError]


class WaveSpeedError(BaseModel):
    """The WaveSpeed v3 envelope, as an error."""

    code: int
    message: str
    data: None


class OpenAIErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    """The OpenAI images dialect's error shape."""

    error: OpenAIErrorInfo


# A dialect answers these in the platform's shape as well: 413 always (api/infra/body_limit.py); 500 and 503
# when the app's handlers answer (an unexpected error, an unreachable database).
PLATFORM_ONLY = frozenset({413})
EITHER = frozenset({500, 503})


def errors(*statuses: int, shape: type[BaseModel] = Error) -> dict[int | str, dict[str, Any]]:
    """Documented error responses in a dialect's `shape` (default: the platform's)."""
    documented: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        model: Any = shape
        if shape is not Error and status in PLATFORM_ONLY:
            model = Error
        elif shape is not Error and status in EITHER:
            model = shape | Error
        documented[status] = {"model": model, "description": DESCRIPTIONS[status]}
    return documented


def image(description: str, *types: str) -> dict[int | str, dict[str, Any]]:
    """A 200 answered with an image's bytes."""
    types = types or ("image/png", "image/jpeg", "image/webp")
    content = {media_type: {"schema": {"type": "string", "format": "binary"}} for media_type in types}
    return {200: {"description": description, "content": content}}
