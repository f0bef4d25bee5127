"""The API's own Prometheus series: requests by route template (never the raw path: ids would make a series
each), method, dialect and status; submits by outcome and refusal reason; Try-Sync waiters and open streams.
Plumbing only: the scrape endpoint and the platform gauges it reads are api/routes/metrics.py.

With several API processes on one host (uvicorn --workers, gunicorn), set `PROMETHEUS_MULTIPROC_DIR` to an
empty directory shared by them: every process then writes its samples there and any of them answers a
scrape with the sum (prometheus-client's multiprocess mode). Without it, each process answers for itself.
"""

from __future__ import annotations

import os
from typing import Final

from fastapi.exceptions import RequestValidationError
from prometheus_client import Counter, Gauge, Histogram
from starlette.requests import Request
from starlette.types import Scope

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
