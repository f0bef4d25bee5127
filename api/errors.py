"""Errors, decided in one place: services raise what went wrong, `ANSWERS` says what status and headers that
is, and each dialect only renders the answer in its own shape (`dialect_route`; the platform's own shape,
`{"error": ...}`, everywhere else). Never a traceback or an exception's own text in a response.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from botocore.exceptions import BotoCoreError, ClientError
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from redis.exceptions import RedisError
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.infra import metrics

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """A request the platform cannot serve; the subclass says why, the message what, in the client's terms.
    `retry_after` sets the header; `extra` adds JSON fields (e.g. `detail`, `known_models`, `id`)."""

    def __init__(self, message: str, *, retry_after: int | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.extra = extra


class BadRequest(ServiceError):
    """The body cannot be parsed at all (not UTF-8, multipart without a boundary)."""


class Invalid(ServiceError):
    """The request's own values are wrong; the message names the field."""


class ContentRefused(ServiceError):
    """The content policy refused the request (its prompt) or its outputs (docs/safety.md). The message names the
    policy, never the term that matched. Raised with `code=CONTENT_POLICY` (OpenAI's error code for it)."""


CONTENT_POLICY = "content_policy_violation"


class Unauthenticated(ServiceError):
    pass


class Forbidden(ServiceError):
    pass


class NotFound(ServiceError):
    """Absent, or another tenant's."""


class Conflict(ServiceError):
    pass


class Gone(ServiceError):
    """Existed, but is no longer stored (an expired or deleted prediction's outputs)."""


class TooLarge(ServiceError):
    pass


class RateLimited(ServiceError):
    pass


class OverCapacity(ServiceError):
    """A tenant's in-flight cap, or a limit of the platform's own capacity."""


class Unavailable(ServiceError):
    """A dependency (database, queue, storage) does not answer; the client should retry."""

    def __init__(self, message: str, *, retry_after: int | None = 1, **extra: Any) -> None:
        super().__init__(message, retry_after=retry_after, **extra)


class NotEnabled(ServiceError):
    """A feature this deployment has switched off (the prompt enhancer: KLEIN_ENHANCER=off)."""


class GenerationFailed(ServiceError):
    """A synchronous dialect's prediction failed or was canceled."""


class TimedOut(ServiceError):
    """A synchronous dialect's prediction outlasted the wait."""


# The one table: what each kind of error answers.
ANSWERS: dict[type[ServiceError], int] = {
    BadRequest: 400,
    ContentRefused: 400,
    Unauthenticated: 401,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    Gone: 410,
    TooLarge: 413,
    Invalid: 422,
    RateLimited: 429,
    OverCapacity: 429,
    GenerationFailed: 500,
    NotEnabled: 501,
    Unavailable: 503,
    TimedOut: 504,
}
DATABASE_ERRORS = (DBAPIError, asyncpg.PostgresError, asyncpg.InterfaceError)
# Exceptions from outside our code that still have an answer: a dependency that failed, a malformed request.
EXTERNAL_ERRORS = (
    RequestValidationError,
    StarletteHTTPException,
    *DATABASE_ERRORS,
    RedisError,
    BotoCoreError,
    ClientError,
    OSError,
    RecursionError,
)
ANSWERABLE = (ServiceError, *EXTERNAL_ERRORS)
TOO_DEEP = "invalid request: body: JSON nested too deeply"
_DEPENDENCIES = {"asyncpg": "database", "sqlalchemy": "database", "redis": "queue", "botocore": "storage"}


@dataclass(frozen=True)
class Answer:
    status: int
    message: str
    extra: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


def answer(exc: BaseException) -> Answer | None:
    """What `exc` answers, or None for a fault of ours (a 500 whose details stay in the log)."""
    if isinstance(exc, ServiceError):
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else {}
        return Answer(ANSWERS[type(exc)], exc.message, exc.extra, headers)
    if isinstance(exc, RequestValidationError):
        return answer(validation_error(exc.errors()))
    if isinstance(exc, StarletteHTTPException):
        if isinstance(exc.__cause__, RecursionError):  # FastAPI could not parse a body this deep
            return answer(Invalid(TOO_DEEP))
        return Answer(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))
    if isinstance(exc, RecursionError):
        return answer(Invalid(TOO_DEEP)) if _from_json(exc) else None
    sqlstate = getattr(exc, "sqlstate", None) or getattr(getattr(exc, "orig", None), "sqlstate", None)
    if str(sqlstate or "").startswith("22"):  # PostgreSQL's data exceptions: the request's own values
        return answer(Invalid("invalid request: a value cannot be stored, e.g. text with a NUL character"))
    dependency = _dependency(exc)
    if dependency is None:
        return None
    log.warning("%s error: %s", dependency, exc)
    return answer(Unavailable(f"{dependency} unavailable, try again shortly"))


def _dependency(exc: BaseException) -> str | None:
    """Which dependency failed, from the innermost of our clients' frames the exception passed through (an
    OSError says nothing of where it came from: a refused connection to PostgreSQL is one)."""
    if isinstance(exc, DATABASE_ERRORS):
        return "database"
    if isinstance(exc, RedisError):
        return "queue"
    if isinstance(exc, BotoCoreError | ClientError):
        return "storage"
    found = None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        found = _DEPENDENCIES.get(str(frame.f_globals.get("__name__", "")).partition(".")[0], found)
    return found


def _from_json(exc: RecursionError) -> bool:
    return any(
        str(frame.f_globals.get("__name__", "")).startswith("json") for frame, _ in traceback.walk_tb(exc.__traceback__)
    )


def validation_error(errors: Sequence[Any], prefix: tuple[str | int, ...] = ()) -> Invalid:
    """422 naming every offending field, e.g. `input.num_inference_steps: ...`."""
    detail = [
        {"loc": [*prefix, *_located(e["loc"])], "msg": e["msg"].removeprefix("Value error, "), "type": e["type"]}
        for e in errors
    ]
    summary = "; ".join(f"{'.'.join(str(part) for part in d['loc']) or 'body'}: {d['msg']}" for d in detail)
    return Invalid(f"invalid request: {summary}", detail=detail)


def _located(loc: Sequence[str | int]) -> list[str | int]:
    return list(loc[1:]) if loc[:1] == ("body",) or loc[:1] == ["body"] else list(loc)


Renderer = Callable[[Answer], Response]
Handler = Callable[[Request], Coroutine[Any, Any, Response]]


def platform_error(error: Answer) -> Response:
    """The platform's own shape: `{"error": "<what is wrong>", ...}`."""
    return JSONResponse({"error": error.message, **error.extra}, status_code=error.status, headers=error.headers)


PROBLEM_TITLES = {
    400: "Bad request",
    401: "Unauthenticated",
    403: "Forbidden",
    404: "Not found",
    409: "Conflict",
    410: "Gone",
    413: "Request entity too large",
    422: "Input validation failed",
    429: "Request was throttled",
    500: "Prediction failed",
    501: "Not enabled",
    503: "Service unavailable",
    504: "Prediction timed out",
}


def problem_details(error: Answer) -> Response:
    """Replicate's shape, RFC 9457 problem details: `{"title", "detail", "status"}`, with Replicate's
    `invalid_fields` naming each field of a 422."""
    body = {"title": PROBLEM_TITLES.get(error.status, "Error"), "detail": error.message, "status": error.status}
    body |= {name: value for name, value in error.extra.items() if name != "detail"}  # e.g. known_models
    if isinstance(fields := error.extra.get("detail"), list):
        body["invalid_fields"] = [
            {"type": f["type"], "field": ".".join(str(part) for part in f["loc"]), "description": f["msg"]}
            for f in fields
        ]
    return JSONResponse(body, status_code=error.status, media_type="application/problem+json")


async def answered(request: Request, render: Renderer, call: Handler) -> Response:
    """`call`'s response, or what it raised answered (`ANSWERS`, `answer`) in `render`'s shape: a dialect's
    routes (`dialect_route`), or the part of a shared route that speaks another dialect."""
    try:
        return await call(request)
    except ANSWERABLE as exc:
        metrics.refused(request, exc)
        error = answer(exc)
        if error is None:
            raise
    response = render(error)
    response.headers.update(error.headers)
    return response


def dialect_route(render: Renderer) -> type[APIRoute]:
    """A route class answering every error with an answer (`ANSWERS`, `answer`) in a dialect's own shape."""
    return negotiated_route(lambda _: render)


def negotiated_route(renderer_for: Callable[[Request], Renderer | None]) -> type[APIRoute]:
    """`dialect_route` for a route two dialects share: the shape the request's dialect reads (None: the
    platform's, by the app's handlers)."""

    class DialectRoute(APIRoute):
        def get_route_handler(self) -> Handler:
            handler = super().get_route_handler()

            async def route(request: Request) -> Response:
                render = renderer_for(request)
                return await (handler(request) if render is None else answered(request, render, handler))

            return route

    return DialectRoute


def install_error_handlers(app: FastAPI) -> None:
    """Everything outside a dialect route: the platform's shape, by the same table."""

    async def handle(request: Request, exc: Exception) -> Response:
        metrics.refused(request, exc)
        error = answer(exc)
        if error is None:
            log.error("unhandled error", exc_info=exc)
            return platform_error(Answer(500, "internal server error"))
        return platform_error(error)

    for kind in ANSWERABLE:
        app.add_exception_handler(kind, handle)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse({"error": "internal server error"}, status_code=500)
