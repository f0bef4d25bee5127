"""The API's own Prometheus series: requests by route template (never the raw path: ids would make a series
each), method, dialect and status, less Prometheus' scrapes and the probes; submits by outcome and refusal reason;
Try-Sync waiters and how their waits ended; cancels (deadlines' apart); open streams; the build. Plumbing only:
the scrape endpoint and the platform gauges it reads are api/routes/metrics.py.

With several API processes on one host (uvicorn --workers, gunicorn), set `PROMETHEUS_MULTIPROC_DIR` to an
empty directory shared by them: every process then writes its samples there and any of them answers a
scrape with the sum (prometheus-client's multiprocess mode). Without it, each process answers for itself.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

from fastapi.exceptions import RequestValidationError
from prometheus_client import Counter, Gauge, Histogram
from starlette.requests import Request
from starlette.types import Scope

from core import build, logs

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
_SUBMIT_MARK: Final = "_klein_creates_predictions"
_SYNC_WAIT: Final = "klein_sync_wait"
Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])
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
SYNC_WAITS = Counter(
    "klein_sync_waits",
    "Try-Sync waits by how they ended: answered (final in time), fell_back (answered pending, 201/202), timed_out"
    " (504), not_waited (the tenant's concurrent waits were all taken)",
    ["dialect", "outcome"],
)
CANCELED = Counter(
    "klein_predictions_canceled", "Predictions canceled, by where they were (queued, running)", ["dialect", "stage"]
)
DEADLINE_CANCELED = Counter(
    "klein_predictions_deadline_canceled",
    "Queued predictions the API canceled for their deadline as their status was read (core/deadlines.py)",
    ["dialect"],
)
STREAMS = Gauge(
    "klein_event_streams", "Open event streams (GET /v1/predictions/{id}/stream)", multiprocess_mode="livesum"
)
BUILD_INFO = build.BUILD_INFO  # klein_build_info, as in every process
# Prometheus' scrapes and the orchestrator's probes are no API traffic: counting them would hide it.
UNCOUNTED = ("/metrics", "/healthz", "/readyz")


def submit_route(endpoint: Endpoint) -> Endpoint:
    """Mark a route's endpoint as one that creates predictions: its answers count in `klein_submits_total`, its
    refusals by reason (tests/unit/test_submit_metrics.py holds every such POST route of the app to it)."""
    setattr(endpoint, _SUBMIT_MARK, True)
    return endpoint


def is_submit(route: object) -> bool:
    return bool(getattr(getattr(route, "endpoint", None), _SUBMIT_MARK, False))


def _dialect(scope: Scope) -> str:
    return (getattr(scope.get("route"), "tags", None) or ["none"])[0]


def record(scope: Scope, status: int, seconds: float) -> None:
    """Count one answered request by its route template, the route's dialect (its tag) and status; and how its
    Try-Sync wait ended, if it waited."""
    route = scope.get("route")
    template = getattr(route, "path", "unmatched")
    if any(template == path or template.startswith(f"{path}/") for path in UNCOUNTED):
        return
    dialect = _dialect(scope)
    method = scope["method"]
    REQUESTS.labels(template, method, dialect, str(status)).inc()
    LATENCY.labels(template, method, dialect).observe(seconds)
    state = scope.get("state", {})
    if method == "POST" and is_submit(route):
        reason = state.get("refusal") or ("" if status < 400 else f"http_{status}")
        SUBMITTED.labels(dialect, "accepted" if status < 400 else "refused", reason).inc()
    if waited := state.get(_SYNC_WAIT):
        outcome = waited if waited != "pending" else "timed_out" if status == 504 else "fell_back"
        SYNC_WAITS.labels(dialect, outcome).inc()


def sync_waited(outcome: str) -> None:
    """Note how the request's Try-Sync wait ended (answered, pending, not_waited), for `record` to count with the
    answer's status: a pending row is answered 201/202 by some dialects, 504 by the synchronous ones."""
    scope = logs.current_scope.get()
    if scope is not None:
        scope.setdefault("state", {})[_SYNC_WAIT] = outcome


def canceled(running: bool) -> None:
    scope = logs.current_scope.get()
    CANCELED.labels("none" if scope is None else _dialect(scope), "running" if running else "queued").inc()


def deadline_canceled() -> None:
    scope = logs.current_scope.get()
    DEADLINE_CANCELED.labels("none" if scope is None else _dialect(scope)).inc()


def refused(request: Request, exc: BaseException) -> None:
    """Remember why a request was refused, for the submit counter (RateLimited → rate_limited, …)."""
    name = "Invalid" if isinstance(exc, RequestValidationError) else type(exc).__name__
    request.state.refusal = "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


class AtMostEvery:
    """`read(ctx)` run at most once per `metrics_refresh_s`, however many scrapes come: those arriving while it
    runs wait for that run rather than start their own (the platform gauges, the dependency probes)."""

    def __init__(self, read: Callable[[Any], Awaitable[object]]) -> None:
        self.read = read
        self.done_at = -float("inf")
        self.lock = asyncio.Lock()

    async def __call__(self, ctx: Any) -> None:
        interval = ctx.settings.metrics_refresh_s
        if time.monotonic() - self.done_at < interval:
            return
        async with self.lock:
            if time.monotonic() - self.done_at < interval:
                return
            await self.read(ctx)
            self.done_at = time.monotonic()
