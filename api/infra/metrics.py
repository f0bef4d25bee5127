"""The API's own Prometheus series: requests by route template (never the raw path: ids would make a series
each), method, dialect and status; submits by outcome and refusal reason; Try-Sync waiters and open streams.
Plumbing only: the scrape endpoint and the platform gauges it reads are api/routes/metrics.py.

With several API processes on one host (uvicorn --workers, gunicorn), set `PROMETHEUS_MULTIPROC_DIR` to an
empty directory shared by them: every process then writes its samples there and any of them answers a
scrape with the sum (prometheus-client's multiprocess mode). Without it, each process answers for itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Final, TypeVar

from fastapi.exceptions import RequestValidationError
from prometheus_client import Counter, Gauge, Histogram
from starlette.requests import Request
from starlette.types import Scope

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
_SUBMIT_MARK: Final = "_klein_creates_predictions"
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
STREAMS = Gauge(
    "klein_event_streams", "Open event streams (GET /v1/predictions/{id}/stream)", multiprocess_mode="livesum"
)


def submit_route(endpoint: Endpoint) -> Endpoint:
    """Mark a route's endpoint as one that creates predictions: its answers count in `klein_submits_total`, its
    refusals by reason (tests/unit/test_submit_metrics.py holds every such POST route of the app to it)."""
    setattr(endpoint, _SUBMIT_MARK, True)
    return endpoint


def is_submit(route: object) -> bool:
    return bool(getattr(getattr(route, "endpoint", None), _SUBMIT_MARK, False))


def record(scope: Scope, status: int, seconds: float) -> None:
    """Count one answered request by its route template, the route's dialect (its tag) and status."""
    route = scope.get("route")
    template = getattr(route, "path", "unmatched")
    dialect = (getattr(route, "tags", None) or ["none"])[0]
    method = scope["method"]
    REQUESTS.labels(template, method, dialect, str(status)).inc()
    LATENCY.labels(template, method, dialect).observe(seconds)
    if method == "POST" and is_submit(route):
        reason = scope.get("state", {}).get("refusal") or ("" if status < 400 else f"http_{status}")
        SUBMITTED.labels(dialect, "accepted" if status < 400 else "refused", reason).inc()


def refused(request: Request, exc: BaseException) -> None:
    """Remember why a request was refused, for the submit counter (RateLimited → rate_limited, …)."""
    name = "Invalid" if isinstance(exc, RequestValidationError) else type(exc).__name__
    request.state.refusal = "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")
