"""Tracing (core/tracing.py): one prediction's trace, exported over OTLP/HTTP by a real API, GPU worker and webhook
worker to a collector in this process, spans the request, the queue, the worker's stages, the S3 upload and the
webhook's delivery."""

from __future__ import annotations

import gzip
import json
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto
from sqlalchemy import Engine

from ops.embedded import Service, start_api, start_webhook_worker, start_worker
from tests.conftest import make_tenant
from tests.receiver import Receiver

REQUEST_ID = "trace-req-" + secrets.token_hex(4)


@dataclass(frozen=True)
class Span:
    service: str
    trace_id: str
    span_id: str
    parent_id: str  # "" for a root
    name: str
    kind: int
    attributes: dict[str, Any]


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return None if kind is None else getattr(value, kind)


@dataclass
class Collector:
    """An OTLP/HTTP trace receiver (POST /v1/traces, protobuf) on loopback, keeping every span it gets."""

    spans: list[Span] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> Collector:
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                collector._add(ExportTraceServiceRequest.FromString(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *_: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _add(self, request: ExportTraceServiceRequest) -> None:
        received = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(
                        Span(
                            service=resource.get("service.name", ""),
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_id=span.parent_span_id.hex(),
                            name=span.name,
                            kind=span.kind,
                            attributes={a.key: _value(a.value) for a in span.attributes},
                        )
                    )
        with self._lock:
            self.spans.extend(received)

    def snapshot(self) -> list[Span]:
        with self._lock:
            return list(self.spans)


@pytest.fixture
def collector() -> Iterator[Collector]:
    collector = Collector().start()
    yield collector
    collector.stop()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver().start()
    yield receiver
    receiver.stop()


def _trace_of(spans: list[Span], prediction_id: str) -> tuple[Span, list[Span]] | None:
    """The API's span of the submit and every span of its trace, once the worker's stages have arrived."""
    requests = [
        s
        for s in spans
        if s.service == "klein-api" and s.kind == SpanProto.SPAN_KIND_SERVER and s.name == "POST /v1/predictions"
    ]
    uploads = [s for s in spans if s.name == "upload" and s.attributes.get("klein.prediction_id") == prediction_id]
    for request in requests:
        trace = [s for s in spans if s.trace_id == request.trace_id]
        if any(s.span_id in {u.span_id for u in uploads} for s in trace):
            puts = [s for s in trace if s.name == "S3.PutObject"]
            names = {s.name for s in trace}
            if puts and {"inference", "encode", "run/klein.predict", "run/klein.webhooks.deliver"} <= names:
                return request, trace
    return None


def _ancestors(span: Span, by_id: dict[str, Span]) -> list[str]:
    chain = []
    while span.parent_id and span.parent_id in by_id:
        span = by_id[span.parent_id]
        chain.append(span.span_id)
    return chain


def test_one_trace_spans_api_queue_worker_and_upload(
    settings_env: dict[str, str], engine: Engine, collector: Collector, receiver: Receiver, tmp_path: Path
) -> None:
    env = settings_env | {
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "200",
        "KLEIN_QUEUE_NAME": f"klein-tracing-{secrets.token_hex(4)}",  # not the session workers' queues
        "KLEIN_WORKER_METRICS_PORT": "0",  # the session's worker holds its port (a taken port stops a worker)
    }
    services: list[Service] = []
    try:
        services.append(start_worker(env, tmp_path / "worker.log", "tracing-worker"))
        services.append(start_webhook_worker(env, tmp_path / "webhooks.log", "tracing-webhooks"))
        api, api_url = start_api(env, tmp_path / "api.log")
        services.append(api)
        key = make_tenant(engine).key
        with httpx.Client(base_url=api_url, headers={"apikey": key}, timeout=180) as client:
            answer = client.post(
                "/v1/predictions",
                headers={"Model": "flux-klein-4b", "Try-Sync": "true", "X-Request-ID": REQUEST_ID},
                json={
                    "input": {"prompt": "A lighthouse on a cliff at dusk", "aspect_ratio": "1:1"},
                    "webhook": receiver.url,
                    "webhook_events_filter": ["completed"],
                },
            )
            assert answer.status_code in (200, 201), answer.text
            prediction = answer.json()
            # On a busy machine the Try-Sync wait may end first (201): then the prediction is followed to its end.
            deadline = time.monotonic() + 300
            while prediction["status"] not in ("succeeded", "failed", "canceled"):
                assert time.monotonic() < deadline, prediction
                time.sleep(0.2)
                prediction = client.get(prediction["get_url"]).json()
        assert prediction["status"] == "succeeded", prediction

        deadline = time.monotonic() + 30
        while (found := _trace_of(collector.snapshot(), prediction["id"])) is None:
            assert time.monotonic() < deadline, sorted({(s.service, s.name) for s in collector.snapshot()})
            time.sleep(0.1)
        while not _lines(tmp_path / "webhooks.log", request_id=REQUEST_ID):
            assert time.monotonic() < deadline, "the webhook worker logged no attempt under the request id"
            time.sleep(0.1)
    finally:
        for service in reversed(services):
            service.stop()

    request, trace = found
    assert {s.service for s in trace} == {"klein-api", "klein-worker", "klein-webhooks"}
    assert request.attributes.get("http.route") == "/v1/predictions"
    by_name = {s.name: s for s in trace}
    (run,) = [s for s in trace if s.name == "run/klein.predict"]
    assert run.service == "klein-worker" and run.kind == SpanProto.SPAN_KIND_CONSUMER
    assert run.parent_id == request.span_id  # the context crossed the queue in the task's headers
    inference = by_name["inference"]
    assert inference.attributes["klein.prediction_id"] == prediction["id"]
    assert (inference.attributes["klein.width"], inference.attributes["klein.height"]) == (1024, 1024)
    assert inference.attributes["klein.steps"] == 4 and inference.attributes["klein.images"] == 1
    put = next(s for s in trace if s.name == "S3.PutObject")
    assert put.attributes.get("rpc.method") == "PutObject"

    by_id = {s.span_id: s for s in trace}
    worker_spans = [s for s in trace if s.service == "klein-worker"]
    for span in [*(by_name[name] for name in ("claim", "inference", "encode", "upload", "finish")), put]:
        assert span.service == "klein-worker"
        assert run.span_id in _ancestors(span, by_id), span.name
    for span in worker_spans:  # everything the worker did for it descends from the API's request
        assert request.span_id in _ancestors(span, by_id), span.name
    # The worker queued the webhook's sending in its task (core.queue.kick_webhooks): the trace goes on there.
    deliver = next(s for s in trace if s.name == "run/klein.webhooks.deliver")
    assert deliver.service == "klein-webhooks" and run.span_id in _ancestors(deliver, by_id)
    assert by_id[put.parent_id].name == "upload"
    # The readiness probes the test started the API with (and their S3 HeadBucket) left no trace.
    assert [s.name for s in collector.snapshot() if s.service == "klein-api" and s.trace_id != request.trace_id] == []

    # The client's X-Request-ID went with the job to the worker and the webhook; each line in the trace has its id.
    (access,) = _lines(tmp_path / "api.log", request_id=REQUEST_ID, event="request")
    assert access["trace_id"] == request.trace_id and access["prediction_id"] == prediction["id"]
    (finished,) = _lines(tmp_path / "worker.log", request_id=REQUEST_ID, logger="klein.prediction")
    assert finished["trace_id"] == request.trace_id and finished["outcome"] == "completed"
    worker_lines = _lines(tmp_path / "worker.log", prediction_id=prediction["id"])
    assert worker_lines and all(line["trace_id"] == request.trace_id for line in worker_lines)
    (attempt,) = _lines(tmp_path / "webhooks.log", request_id=REQUEST_ID)  # httpx's own line only at DEBUG
    assert attempt["trace_id"] == request.trace_id and "→ delivered" in attempt["event"]
    (sent,) = receiver.received
    assert sent.headers.get("x-request-id", sent.headers.get("X-Request-ID")) == REQUEST_ID


def _lines(path: Path, **fields: str) -> list[dict[str, Any]]:
    """The log's JSON lines having these fields (Celery's plain notice on stopping aside)."""
    if not path.exists():
        return []
    found = []
    for text in path.read_text().splitlines():
        if not text.startswith("{"):
            continue
        line = json.loads(text)
        if all(line.get(name) == value for name, value in fields.items()):
            found.append(line)
    return found
