"""Errors: one exception type for the API, one JSON shape, never a traceback in a response."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from redis.exceptions import RedisError
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)
# From SQLAlchemy, and from the hot statements run on asyncpg directly (api/pg.py).
DATABASE_ERRORS = (DBAPIError, asyncpg.PostgresError, asyncpg.InterfaceError)


class ApiError(Exception):
    """An answer to the client: status, a readable message, extra JSON fields; `retry_after` sets the header."""

    def __init__(self, status: int, message: str, retry_after: int | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra
        self.headers = {"Retry-After": str(retry_after)} if retry_after is not None else None


def validation_error(errors: Sequence[Any], prefix: tuple[str | int, ...] = ()) -> ApiError:
    """422 naming every offending field, e.g. `input.num_inference_steps: ...`."""
    detail = [
        {"loc": [*prefix, *_located(e["loc"])], "msg": e["msg"].removeprefix("Value error, "), "type": e["type"]}
        for e in errors
    ]
    summary = "; ".join(f"{'.'.join(str(part) for part in d['loc']) or 'body'}: {d['msg']}" for d in detail)
    return ApiError(422, f"invalid request: {summary}", detail=detail)


def _located(loc: Sequence[str | int]) -> list[str | int]:
    return list(loc[1:]) if loc[:1] == ("body",) or loc[:1] == ["body"] else list(loc)


def dialect_route(render: Callable[[ApiError], Response]) -> type[APIRoute]:
    """A route class answering ApiError and request validation errors in a dialect's own error shape."""

    class DialectRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def route(request: Request) -> Response:
                try:
                    return await handler(request)
                except ApiError as exc:
                    error = exc
                except RequestValidationError as exc:
                    error = validation_error(exc.errors())
                except StarletteHTTPException as exc:  # e.g. a malformed multipart body (400)
                    error = http_error(exc)
                except DATABASE_ERRORS as exc:
                    if (unstorable := unstorable_value(exc)) is None:
                        raise
                    error = unstorable
                response = render(error)
                response.headers.update(error.headers or {})
                return response

            return route

    return DialectRoute


TOO_DEEP = "invalid request: body: JSON nested too deeply"


def http_error(exc: StarletteHTTPException) -> ApiError:
    """Starlette's and FastAPI's own errors as ours. A body FastAPI could not parse because it nests deeper
    than Python's recursion limit is the client's invalid JSON (422), not a parse failure of ours (400)."""
    if isinstance(exc.__cause__, RecursionError):
        return ApiError(422, TOO_DEEP)
    error = ApiError(exc.status_code, str(exc.detail))
    error.headers = dict(exc.headers) if exc.headers else None
    return error


def unstorable_value(exc: Exception) -> ApiError | None:
    """422 for PostgreSQL's data exceptions (SQLSTATE class 22): the request's own values, e.g. a NUL character."""
    sqlstate = getattr(exc, "sqlstate", None) or getattr(getattr(exc, "orig", None), "sqlstate", None)
    if str(sqlstate or "").startswith("22"):
        return ApiError(422, "invalid request: a value cannot be stored, e.g. text with a NUL character")
    return None


def _body(message: str, **extra: Any) -> dict[str, Any]:
    return {"error": message, **extra}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(_body(exc.message, **exc.extra), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        error = validation_error(exc.errors())
        return JSONResponse(_body(error.message, **error.extra), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = http_error(exc)
        return JSONResponse(_body(error.message), status_code=error.status, headers=error.headers)

    async def _database_down(_: Request, exc: Exception) -> JSONResponse:
        if (unstorable := unstorable_value(exc)) is not None:
            return JSONResponse(_body(unstorable.message), status_code=unstorable.status)
        log.warning("database error: %s", exc)
        return JSONResponse(
            _body("database unavailable, try again shortly"), status_code=503, headers={"Retry-After": "1"}
        )

    for database_error in (*DATABASE_ERRORS, OSError):  # asyncpg raises a failed connect as OSError (refused)
        app.add_exception_handler(database_error, _database_down)

    @app.exception_handler(RedisError)
    async def _redis_down(_: Request, exc: Exception) -> JSONResponse:
        log.warning("redis error: %s", exc)
        return JSONResponse(
            _body("queue unavailable, try again shortly"), status_code=503, headers={"Retry-After": "1"}
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(_body("internal server error"), status_code=500)
