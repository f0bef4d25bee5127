"""The API's Prometheus metrics: `GET /metrics` in the text format (prometheus-client).

With several API processes on one host (uvicorn --workers, gunicorn), set `PROMETHEUS_MULTIPROC_DIR` to an
empty directory shared by them: every process then writes its samples there and any of them answers a
scrape with the sum (prometheus-client's multiprocess mode). Without it, each process answers for itself.

Requests are counted by route template (never the raw path: ids would make a series each), method,
dialect and status. Queue depth and age, webhook backlog, live workers and (behind
`KLEIN_METRICS_PER_TENANT`, for its label cardinality) in-flight per tenant are read from PostgreSQL and Redis
at most once per `KLEIN_METRICS_REFRESH_S` however many scrapes come (concurrent ones wait for the same
read). With `KLEIN_METRICS_TOKEN` set (`klein up` sets one) a scrape needs `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import time
from typing import TYPE_CHECKING, Final

from fastapi.exceptions import RequestValidationError
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Scope

from api.services import fleet

if TYPE_CHECKING:
    from api.context import AppContext

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
# The routes that accept work: their refusals are counted by reason.
SUBMITS = {"/v1/predictions", "/v1/generate", "/api/v3/{model_path:path}", "/v1/images/generations", "/api/features"}
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

LAST: Final = "mostrecent"  # multiprocess mode: the value last written, by whichever process read it
REQUESTS = Counter("klein_http_requests", "HTTP requests answered", ["route", "method", "dialect", "status"])
LATENCY = Histogram(
    "klein_http_request_seconds", "Time to the response's end", ["route", "method", "dialect"], buckets=LATENCY_BUCKETS
)
SUBMITTED = Counter(
    "klein_submits", "Submits by outcome (accepted, refused) and refusal reason", ["dialect", "outcome", "reason"]
)
SYNC_WAITERS = Gauge("klein_sync_waiters", "Requests waiting for a prediction (Try-Sync)", multiprocess_mode="livesum")
STREAMS = Gauge(
    "klein_event_streams", "Open event streams (GET /v1/predictions/{id}/stream)", multiprocess_mode="livesum"
)
QUEUE_DEPTH = Gauge("klein_queue_depth", "Messages in the broker, by priority", ["priority"], multiprocess_mode=LAST)
QUEUE_AGE = Gauge(
    "klein_queue_oldest_age_seconds",
    "Age of the oldest queued prediction, by priority (0: none queued)",
    ["priority"],
    multiprocess_mode=LAST,
)
LIVE_WORKERS = Gauge("klein_live_workers", "GPU workers that announced themselves lately", multiprocess_mode=LAST)
WEBHOOK_BACKLOG = Gauge("klein_webhook_backlog", "Webhook deliveries pending or being sent", multiprocess_mode=LAST)
WEBHOOK_AGE = Gauge(
    "klein_webhook_oldest_pending_age_seconds",
    "Age of the oldest webhook event not yet delivered (0: none)",
    multiprocess_mode=LAST,
)
TENANT_IMAGES = Gauge(
    "klein_tenant_images_24h", "Images billed in the last 24 hours, per tenant", ["tenant"], multiprocess_mode=LAST
)
TENANT_IN_FLIGHT = Gauge(
    "klein_tenant_in_flight", "Queued + processing, per tenant", ["tenant"], multiprocess_mode=LAST
)


REFRESHES = Counter(
    "klein_metrics_refreshes", "Reads of the platform gauges from PostgreSQL and Redis (at most one per interval)"
)


def record(scope: Scope, status: int, seconds: float) -> None:
    """Count one answered request by its route template, the route's dialect (its tag) and status."""
    route = scope.get("route")
    template = getattr(route, "path", "unmatched")
    dialect = (getattr(route, "tags", None) or ["none"])[0]
    method = scope["method"]
    REQUESTS.labels(template, method, dialect, str(status)).inc()
    LATENCY.labels(template, method, dialect).observe(seconds)
    if method == "POST" and template in SUBMITS:
        reason = scope.get("state", {}).get("refusal") or ("" if status < 400 else f"http_{status}")
        SUBMITTED.labels(dialect, "accepted" if status < 400 else "refused", reason).inc()


def refused(request: Request, exc: BaseException) -> None:
    """Remember why a request was refused, for the submit counter (RateLimited → rate_limited, …)."""
    name = "Invalid" if isinstance(exc, RequestValidationError) else type(exc).__name__
    request.state.refusal = "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


async def endpoint(request: Request) -> Response:
    ctx: AppContext = request.app.state.ctx
    if not _authorized(request, ctx):
        return Response("metrics need the bearer token set in KLEIN_METRICS_TOKEN\n", status_code=401)
    await _gauges.refresh(ctx)
    if MULTIPROCESS:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def _authorized(request: Request, ctx: AppContext) -> bool:
    token = ctx.settings.metrics_token
    if token is None:
        return True
    given = request.headers.get("authorization", "").encode()
    expected = f"Bearer {token.get_secret_value()}".encode()
    return hmac.compare_digest(hashlib.sha256(given).digest(), hashlib.sha256(expected).digest())


class _Gauges:
    """The platform gauges' last read, kept for `metrics_refresh_s`; one read at a time."""

    def __init__(self) -> None:
        self.read_at = -float("inf")
        self.lock = asyncio.Lock()

    async def refresh(self, ctx: AppContext) -> None:
        interval = ctx.settings.metrics_refresh_s
        if time.monotonic() - self.read_at < interval:
            return
        async with self.lock:  # scrapes arriving meanwhile wait for this read rather than start their own
            if time.monotonic() - self.read_at < interval:
                return
            await _read_gauges(ctx)
            self.read_at = time.monotonic()
            REFRESHES.inc()


_gauges = _Gauges()


async def _read_gauges(ctx: AppContext) -> None:
    per_tenant = ctx.settings.metrics_per_tenant
    state = await fleet.read(ctx, per_tenant)
    for priority, depth in state.depth.items():
        QUEUE_DEPTH.labels(str(priority)).set(depth)
        QUEUE_AGE.labels(str(priority)).set(state.oldest_age_s[priority])
    LIVE_WORKERS.set(state.live_workers)
    WEBHOOK_BACKLOG.set(state.webhook_backlog)
    WEBHOOK_AGE.set(state.webhook_oldest_age_s)
    if per_tenant:
        TENANT_IN_FLIGHT.clear()
        TENANT_IMAGES.clear()
        for tenant_id, count in state.in_flight.items():
            TENANT_IN_FLIGHT.labels(tenant_id).set(count)
        for tenant_id, total in state.images_24h.items():
            TENANT_IMAGES.labels(tenant_id).set(total)
