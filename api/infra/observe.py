"""Per request: an id (the client's `X-Request-ID` if it is sane, else a new one; always answered back), the
logging context (core/logs.py) and the metrics (api/infra/metrics.py). Pure ASGI, one layer for all three."""

from __future__ import annotations

import re
import time
import uuid

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.infra import metrics
from core import logs, tracing

access = structlog.get_logger("klein.access")
_SANE_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


class Observe:
    """`access_log`: also one line per answer, `request` (method, route template, status, duration_ms) with
    the bound fields (request_id, tenant_id, prediction_id, dialect, trace_id); probes and scrapes (/healthz,
    /readyz, /metrics) at debug level only, as they come every few seconds and say nothing of the traffic."""

    def __init__(self, app: ASGIApp, access_log: bool = True) -> None:
        self.app = app
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        given = next((value for name, value in scope["headers"] if name == b"x-request-id"), None)
        request_id = given if given is not None and _SANE_ID.fullmatch(given) else uuid.uuid4().hex.encode()
        logs.clear()  # a kept-alive connection serves its requests in one task: nothing carries over
        logs.bind(request_id=request_id.decode())
        logs.current_scope.set(scope)
        status = 500

        async def answer(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id)]
            await send(message)

        try:
            await self.app(scope, receive, answer)
        finally:
            seconds = time.perf_counter() - started
            metrics.record(scope, status, seconds)
            if self.access_log:
                route = getattr(scope.get("route"), "path", "unmatched")
                line = access.debug if scope["path"] in tracing.UNTRACED_PATHS else access.info
                ms = round(seconds * 1000, 1)
                line("request", method=scope["method"], route=route, status=status, duration_ms=ms)
