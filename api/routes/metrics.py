"""`GET /metrics`: the API process's series (api/infra/metrics.py) and the platform's gauges in Prometheus' text
format (prometheus-client).

Queue depth and age and live and draining workers (per served model), the webhook backlog (by receiver host, the
top `KLEIN_METRICS_WEBHOOK_RECEIVERS` and "other") and (behind `KLEIN_METRICS_PER_TENANT`, for its label
cardinality) in-flight per tenant are read from PostgreSQL and Redis (api/services/fleet.py) at most once per
`KLEIN_METRICS_REFRESH_S` however many scrapes come (concurrent ones wait for the same read). With
`KLEIN_METRICS_TOKEN` set (`klein up` sets one) a scrape needs `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
    multiprocess,
)
from starlette.requests import Request
from starlette.responses import Response

from api.context import AppContext
from api.infra import metrics
from api.services import dependencies, fleet

log = logging.getLogger(__name__)

# `model`: the served models (KLEIN_SERVED_MODELS), so the label's values are as few as the configured models.
QUEUE_DEPTH = Gauge(
    "klein_queue_depth",
    "Messages in the broker, by model and priority",
    ["model", "priority"],
    multiprocess_mode=metrics.LAST,
)
QUEUE_AGE = Gauge(
    "klein_queue_oldest_age_seconds",
    "Age of the oldest queued prediction, by model and priority (0: none queued)",
    ["model", "priority"],
    multiprocess_mode=metrics.LAST,
)
LIVE_WORKERS = Gauge(
    "klein_live_workers",
    "GPU workers of the model that announced themselves lately and take work (draining ones not counted)",
    ["model"],
    multiprocess_mode=metrics.LAST,
)
DRAINING_WORKERS = Gauge(
    "klein_draining_workers",
    "GPU workers of the model an operator drained, still finishing or idle until they exit",
    ["model"],
    multiprocess_mode=metrics.LAST,
)
# By receiver host: the KLEIN_METRICS_WEBHOOK_RECEIVERS with the most waiting, the rest as receiver="other".
WEBHOOK_BACKLOG = Gauge(
    "klein_webhook_backlog",
    "Webhook deliveries pending or being sent, by receiver host",
    ["receiver"],
    multiprocess_mode=metrics.LAST,
)
WEBHOOK_AGE = Gauge(
    "klein_webhook_oldest_pending_age_seconds",
    "Age of the oldest webhook event not yet delivered, by receiver host (0: none)",
    ["receiver"],
    multiprocess_mode=metrics.LAST,
)
TENANT_IMAGES = Gauge(
    "klein_tenant_images_24h",
    "Images billed in the last 24 hours, per tenant",
    ["tenant"],
    multiprocess_mode=metrics.LAST,
)
TENANT_IN_FLIGHT = Gauge(
    "klein_tenant_in_flight", "Queued + processing, per tenant", ["tenant"], multiprocess_mode=metrics.LAST
)

# Read from PostgreSQL and Redis by every API replica alike: a query aggregates them over replicas with max (or
# min), never sum, which would multiply them by the replica count (tests/deploy/test_observability.py holds it).
PLATFORM_GAUGES = (
    QUEUE_DEPTH,
    QUEUE_AGE,
    LIVE_WORKERS,
    DRAINING_WORKERS,
    WEBHOOK_BACKLOG,
    WEBHOOK_AGE,
    TENANT_IMAGES,
    TENANT_IN_FLIGHT,
)

REFRESHES = Counter(
    "klein_metrics_refreshes", "Reads of the platform gauges from PostgreSQL and Redis (at most one per interval)"
)
REFRESH_FAILURES = Counter(
    "klein_metrics_refresh_failures",
    "Reads of the platform gauges that failed (PostgreSQL or Redis unreachable): the gauges keep their last values",
)
READ_TIMEOUT_S = 3.0  # within Prometheus' default 10 s scrape timeout, with the dependency probes' 2 s


async def endpoint(request: Request) -> Response:
    ctx: AppContext = request.app.state.ctx
    if not authorized(request, ctx):
        return Response("metrics need the bearer token set in KLEIN_METRICS_TOKEN\n", status_code=401)
    await dependencies.refresh_gauges(ctx)
    await _gauges(ctx)
    if metrics.MULTIPROCESS:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def authorized(request: Request, ctx: AppContext) -> bool:
    token = ctx.settings.metrics_token
    if token is None:
        return True
    given = request.headers.get("authorization", "").encode()
    expected = f"Bearer {token.get_secret_value()}".encode()
    return hmac.compare_digest(hashlib.sha256(given).digest(), hashlib.sha256(expected).digest())


async def _read_gauges_or_keep(ctx: AppContext) -> None:
    try:
        await asyncio.wait_for(_read_gauges(ctx), READ_TIMEOUT_S)
        REFRESHES.inc()
    except Exception as exc:  # the scrape still answers: klein_dependency_up says what is down
        REFRESH_FAILURES.inc()
        log.warning("platform gauges not read: %s", type(exc).__name__)


_gauges = metrics.AtMostEvery(_read_gauges_or_keep)


async def _read_gauges(ctx: AppContext) -> None:
    per_tenant = ctx.settings.metrics_per_tenant
    state = await fleet.read(ctx, per_tenant)
    for model, queue in state.models.items():
        for priority, depth in queue.depth.items():
            QUEUE_DEPTH.labels(model, str(priority)).set(depth)
            QUEUE_AGE.labels(model, str(priority)).set(queue.oldest_age_s[priority])
        LIVE_WORKERS.labels(model).set(queue.live_workers)
        DRAINING_WORKERS.labels(model).set(queue.draining_workers)
    _set_by_receiver(state.webhook_backlog, state.webhook_oldest_age_s)
    if per_tenant:
        TENANT_IN_FLIGHT.clear()
        TENANT_IMAGES.clear()
        for tenant_id, count in state.in_flight.items():
            TENANT_IN_FLIGHT.labels(tenant_id).set(count)
        for tenant_id, total in state.images_24h.items():
            TENANT_IMAGES.labels(tenant_id).set(total)


_receivers_shown: set[str] = set()


def _set_by_receiver(backlog: dict[str, int], ages: dict[str, float]) -> None:
    """A receiver that no longer waits (or left the top N) loses its series: zeroed first, since multiprocess
    mode keeps a removed series' last value in its file (its alert must resolve)."""
    for gone in _receivers_shown - set(backlog):
        for gauge in (WEBHOOK_BACKLOG, WEBHOOK_AGE):
            gauge.labels(gone).set(0)
            gauge.remove(gone)
    for name, count in backlog.items():
        WEBHOOK_BACKLOG.labels(name).set(count)
        WEBHOOK_AGE.labels(name).set(ages[name])
    _receivers_shown.clear()
    _receivers_shown.update(backlog)
