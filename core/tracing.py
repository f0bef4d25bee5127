"""OpenTelemetry tracing, on when OTEL_EXPORTER_OTLP_ENDPOINT is set (docs/operations.md, "Traces").

One trace per prediction: the API's request (FastAPI instrumentation), the task's headers (`inject`, called
by core.queue.task_message; Celery's own publishes carry it through the Celery instrumentation), the
worker's task (Celery instrumentation) and its stages (`span`), the S3 calls (botocore instrumentation).

Off, this module imports nothing of OpenTelemetry: `enabled` stays False (the API's submit reads only that)
and `span` hands back one shared null context.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI
    from opentelemetry.trace import Span, Tracer
    from opentelemetry.util.types import AttributeValue
    from starlette.types import ASGIApp, Receive, Scope, Send

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
UNTRACED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})  # probes and scrapes: a trace every few seconds

enabled = False
_NO_SPAN: AbstractContextManager[None] = nullcontext()
_tracer: Tracer | None = None
_inject: Callable[[dict[str, Any]], None] | None = None
_current_span: Callable[[], Span] | None = None


def wanted(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment asks for traces: an OTLP endpoint, and the SDK not disabled."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return any(environ.get(name) for name in ENDPOINT_VARIABLES)


def configure(service_name: str, *, app: FastAPI | None = None, celery: bool = False, s3: bool = False) -> bool:
    """Trace this process if `wanted()`: spans go in batches to the OTLP/HTTP endpoint, which the exporter
    reads from the standard OTEL_* variables, as `service.name` = OTEL_SERVICE_NAME or `service_name`.
    Instruments `app` (FastAPI), Celery's task signals (call it after the worker's fork: worker_process_init)
    and botocore (`s3`). Returns whether tracing is on; calling it again only adds instrumentations."""
    global enabled, _tracer, _inject, _current_span
    if not wanted():
        return False
    if not enabled:
        from opentelemetry import propagate, trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        # An explicit service.name outranks OTEL_SERVICE_NAME in Resource.create: the variable is read here.
        resource = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME") or service_name})
        provider = TracerProvider(resource=resource)  # flushes and shuts down at exit (atexit)
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(provider)
        _tracer = trace.get_tracer("klein-serve")
        _inject = propagate.inject
        _current_span = trace.get_current_span
        enabled = True
    if app is not None:
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        app.add_middleware(_Untraced)
        untraced = ",".join(f"{path}$" for path in UNTRACED_PATHS)
        excluded = None if os.environ.get("OTEL_PYTHON_FASTAPI_EXCLUDED_URLS") else untraced
        # One span per request: the ASGI send/receive spans would add several per request and say little.
        FastAPIInstrumentor.instrument_app(app, excluded_urls=excluded, exclude_spans=["receive", "send"])
    if celery:
        from celery.signals import worker_process_shutdown, worker_shutdown
        from opentelemetry.instrumentation.celery import CeleryInstrumentor

        if not CeleryInstrumentor().is_instrumented_by_opentelemetry:
            CeleryInstrumentor().instrument()
            # A pool's child process ends without atexit handlers: flush as it goes.
            worker_process_shutdown.connect(_flush, weak=False)
            worker_shutdown.connect(_flush, weak=False)
    if s3:
        from opentelemetry.instrumentation.botocore import BotocoreInstrumentor

        if not BotocoreInstrumentor().is_instrumented_by_opentelemetry:
            BotocoreInstrumentor().instrument()
    return True


def inject(carrier: dict[str, Any]) -> None:
    """Write the current trace context (`traceparent`, `tracestate` if any) into a task's headers, where the
    worker's Celery instrumentation reads it (task.request). Only when `enabled`: callers check the flag."""
    if _inject is not None:
        _inject(carrier)


def current_ids() -> tuple[str, str] | None:
    """(trace id, span id) in hex of the span this code runs in, for the logs (core/logs.py); None outside one."""
    if _current_span is None:
        return None
    context = _current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


def span(name: str, **attributes: AttributeValue) -> AbstractContextManager[Span | None]:
    """A span around a stage of the current trace, its attributes named `klein.<keyword>`; when tracing is
    off, a null context that costs nothing."""
    if _tracer is None:
        return _NO_SPAN
    return _tracer.start_as_current_span(name, attributes={f"klein.{k}": v for k, v in attributes.items()})


class _Untraced:
    """No spans at all under a probe or a scrape: its request is not traced (excluded_urls), and the calls it
    makes (the dependency probes of /metrics: an S3 HeadBucket) would each start a trace of their own."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in UNTRACED_PATHS:
            from opentelemetry.instrumentation.utils import suppress_instrumentation

            with suppress_instrumentation():
                await self.app(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def _flush(**_: Any) -> None:
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    force_flush = getattr(provider, "force_flush", None)  # the SDK's provider; the API's proxy has none
    if force_flush is not None:
        force_flush()
