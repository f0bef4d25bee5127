"""Floors the platform is measured against, started by `bench.platform` beside the real stack.

* An HTTP app (`uvicorn bench.floors:create_app --factory`, the API's uvicorn settings: one worker):
  `POST /floor/predictions` parses the same JSON body, inserts one row into the same `predictions`
  table with a raw asyncpg pool and pushes one Redis message; `GET /floor/status/{id}` does the
  same primary-key read (id and tenant) with raw asyncpg and answers the row as JSON. No framework
  features beyond routing: what any implementation of these endpoints has to do.
* A bare Celery no-op (`celery -A bench.floors:noop_app worker`) and its client
  (`python -m bench.floors noop-client`): the round trip send → worker → result over the same broker.

Settings come from the environment: KLEIN_DATABASE_URL, KLEIN_REDIS_URL, BENCH_FLOOR_TENANT_ID,
BENCH_FLOOR_LIST (the Redis list the floor pushes to), BENCH_NOOP_QUEUE.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from celery import Celery
from fastapi import FastAPI, Request, Response
from redis.asyncio import Redis

INSERT = """
INSERT INTO predictions (id, tenant_id, model, input, params, status)
VALUES ($1, $2, $3, $4, $5, 'created')
"""
SELECT = "SELECT * FROM predictions WHERE id = $1 AND tenant_id = $2"


def _new_id() -> str:
    return base64.b32encode(secrets.token_bytes(17)).decode().lower().rstrip("=")[:26]


def _plain_url(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"postgresql://{rest}" if scheme.startswith("postgres") else url


async def _json_codec(conn: asyncpg.Connection) -> None:
    for name in ("json", "jsonb"):
        await conn.set_type_codec(
            name, encoder=lambda v: orjson.dumps(v).decode(), decoder=orjson.loads, schema="pg_catalog"
        )


def _default(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    raise TypeError(type(value).__name__)


def create_app() -> FastAPI:
    database_url = _plain_url(os.environ["KLEIN_DATABASE_URL"])
    redis_url = os.environ["KLEIN_REDIS_URL"]
    tenant_id = os.environ["BENCH_FLOOR_TENANT_ID"]
    floor_list = os.environ.get("BENCH_FLOOR_LIST", "bench:floor")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The API's pool: SQLAlchemy pool_size=10, max_overflow=20.
        app.state.pool = await asyncpg.create_pool(database_url, min_size=10, max_size=30, init=_json_codec)
        app.state.redis = Redis.from_url(redis_url)
        try:
            yield
        finally:
            await app.state.redis.aclose()
            await app.state.pool.close()

    app = FastAPI(lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)

    @app.post("/floor/predictions")
    async def submit(request: Request) -> Response:
        body = orjson.loads(await request.body())
        request_input = body["input"]
        model = request.headers.get("model", "flux-klein-4b")
        prediction_id = _new_id()
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


# ---------------------------------------------------------------------------------------------------------------
# The Celery no-op round trip


NOOP_TASK = "bench.noop"


def make_noop_app() -> Celery:
    """Celery configured as core.queue configures the platform's (same broker, solo pool, acks late)."""
    redis_url = os.environ.get("KLEIN_REDIS_URL", "redis://127.0.0.1:6379/14")
    app = Celery("bench-noop", broker=redis_url, backend=redis_url, set_as_current=False)
    app.conf.update(
        task_default_queue=os.environ.get("BENCH_NOOP_QUEUE", "bench-noop"),
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_pool="solo",
        broker_connection_retry_on_startup=True,
        result_expires=600,
    )

    @app.task(name=NOOP_TASK)
    def noop() -> None:
        return None

    return app


noop_app = make_noop_app()


def noop_client(samples: int, warmup: int, out: Path) -> None:
    latencies: list[float] = []
    for i in range(warmup + samples):
        started = time.perf_counter()
        result = noop_app.send_task(NOOP_TASK)
        result.get(timeout=30)
        if i >= warmup:
            latencies.append((time.perf_counter() - started) * 1000)
        result.forget()  # after the clock: the floor is the round trip only
    out.write_text(json.dumps({"latencies_ms": latencies}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.floors")
    sub = parser.add_subparsers(dest="command", required=True)
    client = sub.add_parser("noop-client", help="time Celery no-op round trips (needs a noop worker)")
    client.add_argument("--samples", type=int, default=200)
    client.add_argument("--warmup", type=int, default=20)
    client.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    noop_client(args.samples, args.warmup, args.out)
    sys.exit(0)
