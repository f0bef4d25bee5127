"""The HTTP floor the API is measured against, started by `bench.platform` beside the real stack.

`uvicorn bench.floors:create_app --factory` runs under the API's uvicorn settings (one worker), with the
API's clients (api/infra/pg.py's asyncpg pool, core/redis_connection.py's async client, core.ids's ids) and runtime
(the heap frozen after start-up).
`POST /floor/predictions` parses the same JSON body, inserts one row into the same `predictions` table
and pushes one Redis message; `GET /floor/status/{id}` does the same primary-key read (id and tenant)
and answers the row as JSON. No framework features beyond routing: what any implementation of these
endpoints has to do, on the same footing as the API. (bench/noop.py is the floor of figure 2.)

Settings come from the environment: KLEIN_* as the API reads them, BENCH_FLOOR_TENANT_ID and
BENCH_FLOOR_LIST (the Redis list the floor pushes to).
"""

from __future__ import annotations

import gc
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import orjson
from fastapi import FastAPI, Request, Response

from api.infra.pg import make_pool
from core.ids import new_id
from core.redis_connection import aclose_async_client, async_client
from core.settings import Settings

INSERT = """
INSERT INTO predictions (id, tenant_id, model, input, params, status)
VALUES ($1, $2, $3, $4, $5, 'created')
"""
SELECT = "SELECT * FROM predictions WHERE id = $1 AND tenant_id = $2"


def _default(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    raise TypeError(type(value).__name__)


def create_app() -> FastAPI:
    settings = Settings()  # KLEIN_* from the environment, read as the API reads them
    tenant_id = os.environ["BENCH_FLOOR_TENANT_ID"]
    floor_list = os.environ.get("BENCH_FLOOR_LIST", "bench:floor")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.pool = await make_pool(settings)
        app.state.redis = async_client(settings)
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            await aclose_async_client(app.state.redis)
            await app.state.pool.close()

    app = FastAPI(lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)

    @app.post("/floor/predictions")
    async def submit(request: Request) -> Response:
        body = orjson.loads(await request.body())
        request_input = body["input"]
        model = request.headers.get("model", "flux-klein-4b")
        prediction_id = new_id()  # the API's ids: the same work for the same id
        pool: asyncpg.Pool = request.app.state.pool
        await pool.execute(INSERT, prediction_id, tenant_id, model, request_input, request_input)
        await request.app.state.redis.lpush(floor_list, prediction_id)
        return Response(orjson.dumps({"id": prediction_id, "status": "starting"}), 201, media_type="application/json")

    @app.get("/floor/status/{prediction_id}")
    async def status(prediction_id: str, request: Request) -> Response:
        pool: asyncpg.Pool = request.app.state.pool
        row = await pool.fetchrow(SELECT, prediction_id, tenant_id)
        if row is None:
            return Response(b'{"error":"not found"}', 404, media_type="application/json")
        return Response(orjson.dumps(dict(row), default=_default), media_type="application/json")

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response(b"{}", media_type="application/json")

    return app
