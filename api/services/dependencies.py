"""The API's dependencies, each probed on its own: PostgreSQL, Redis and S3.

Readiness (`/readyz`) needs only PostgreSQL and Redis: submits, status, cancels and listings go without S3 (a
worker uploads; the sweeper and the reaper retry). S3's health is reported apart, by `/healthz/deps` (on
demand) and by `klein_dependency_up` / `klein_dependency_latency_seconds` on /metrics (probed at most once per
`KLEIN_METRICS_REFRESH_S` however many scrapes come). A report names each dependency's state, the probe's time
and, when it failed, the exception's class only: never its message, which may hold an address or a URL.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import Gauge
from sqlalchemy import text

from api.context import AppContext
from api.infra import metrics
from core.settings import Settings
from core.storage import make_s3_client

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

PROBE_TIMEOUT_S = 2.0  # each probe's whole wait; a slower answer counts as down
DEPENDENCIES = ("postgres", "redis", "s3")

UP = Gauge(
    "klein_dependency_up",
    "Whether the dependency answered the API's last probe (1) or not (0)",
    ["dependency"],
    multiprocess_mode=metrics.LAST,
)
LATENCY = Gauge(
    "klein_dependency_latency_seconds",
    "How long the API's last probe of the dependency took (the probe's timeout when it did not answer)",
    ["dependency"],
    multiprocess_mode=metrics.LAST,
)


@dataclass(frozen=True)
class Check:
    ok: bool
    latency_ms: float
    error: str | None = None  # the exception's class

    def report(self) -> dict[str, Any]:
        return {"status": "ok" if self.ok else "error", "latency_ms": self.latency_ms} | (
            {"error": self.error} if self.error else {}
        )


async def check(probe: Callable[[], Awaitable[object]], timeout_s: float = PROBE_TIMEOUT_S) -> Check:
    started = time.perf_counter()
    try:
        await asyncio.wait_for(probe(), timeout_s)
    except Exception as exc:
        error: str | None = type(exc).__name__
    else:
        error = None
    return Check(error is None, round((time.perf_counter() - started) * 1000, 1), error)


async def postgres(ctx: AppContext) -> None:
    async with ctx.engine.connect() as conn:
        await conn.execute(text("SELECT 1"))


async def redis(ctx: AppContext) -> None:
    await ctx.redis.ping()


async def s3(ctx: AppContext) -> None:
    """HeadBucket on a client of its own: one attempt, no longer than the probe, so that a stalled S3 leaves
    no thread waiting through the retries of the API's client."""
    await asyncio.to_thread(_probe_client(ctx.settings).head_bucket, Bucket=ctx.settings.s3_bucket)


_client: tuple[Settings, S3Client] | None = None


def _probe_client(settings: Settings) -> S3Client:
    global _client
    if _client is None or _client[0] is not settings:
        _client = settings, make_s3_client(settings, max_attempts=1, read_timeout_s=PROBE_TIMEOUT_S)
    return _client[1]


async def probe(ctx: AppContext) -> dict[str, Check]:
    """Every dependency probed at once; the gauges set from the result."""
    results = await asyncio.gather(*(check(functools.partial(p, ctx)) for p in (postgres, redis, s3)))
    checks = dict(zip(DEPENDENCIES, results, strict=True))
    for name, result in checks.items():
        UP.labels(name).set(1 if result.ok else 0)
        LATENCY.labels(name).set(result.latency_ms / 1000)
    return checks


refresh_gauges = metrics.AtMostEvery(probe)
